"""Step-specialised ONNX export of the tiny SD-XL U-Net, and sampling with it through ONNX Runtime:
each phase graph equals its PyTorch phase, sessions switch at the manifest's boundaries, requests
the build does not cover are named.

One build (``export_build.CONFIG``, shared by the export tests: 4 steps, ``atedm`` preset, phases
prune-less at step 0 and pruned at steps 1-3) is made once per session (``conftest.built``).
"""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from export_build import STEPS, pytorch_latent

import atedm_compile as ac
from atedm_compile.export import BuildConfig, build, load
from atedm_compile.export.manifest import MANIFEST
from atedm_compile.export.onnx import example_inputs
from atedm_compile.models import build_unet, tiny_sdxl_pipeline

PROMPT = dict(prompt="a red cube", height=256, width=256, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module (PyTorch sampling is the slow part); tests give back its U-Net."""
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    """The PyTorch runner's image and (step, phase) calls for the build's step count."""
    runner = ac.apply(pipe, "atedm")
    try:
        return _sample(pipe), [(c.step, c.phase) for c in runner.calls]
    finally:
        ac.remove(pipe)


@pytest.fixture
def exported(built, pipe):
    """``make(**load_options)`` attaches a loaded build to the shared pipeline, detached after the test."""
    attached = []

    def make(**options):
        unet = load(built[0], **options).attach(pipe)
        attached.append(unet)
        return unet

    yield make
    for unet in attached:
        unet.detach(pipe)


def _sample(pipe, steps=STEPS, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=steps, generator=generator, **{**PROMPT, **kwargs}).images[0]


def test_both_phases_export_with_the_contract(built):
    directory, manifest, records = built
    assert [(p.name, p.start, p.stop) for p in manifest.phases] == [("prune-less", 0, 1), ("pruned", 1, STEPS)]
    assert all(r.ran for r in records if r.name.startswith("export ONNX"))
    for phase in manifest.phases:
        model = onnx.load(str(directory / phase.onnx.file), load_external_data=False)
        inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert inputs == {"sample": [2, 4, 32, 32], "timestep": [], "encoder_hidden_states": [2, 77, 64],
                          "text_embeds": [2, 32], "time_ids": [2, 6]}
        assert [o.name for o in model.graph.output] == ["latent"]
        assert phase.lint == phase.onnx.sha256  # checker and TensorRT lint passed
        ops = {n.op_type for n in model.graph.node}
        assert {"TopK", "GatherElements", "ScatterElements"} <= ops and "NonZero" not in ops
    data = json.loads((directory / MANIFEST).read_text())
    assert data["format_version"] == 2 and data["complete"] and data["tools"]["torch"]


def test_each_phase_graph_matches_its_pytorch_phase(built, pipe):
    directory, manifest, _ = built
    unet = load(directory)
    runner = ac.apply(pipe.unet, ac.make_schedule("atedm", STEPS))
    runner.start(STEPS)
    feed = example_inputs(manifest.phases[0].inputs, seed=3)
    outputs = {}
    try:
        for phase in manifest.phases:
            runner.use_phase(phase.name)
            reference = pytorch_latent(pipe.unet, feed)
            outputs[phase.name] = unet.engines[phase.name].infer(feed)["latent"]
            assert (outputs[phase.name] - reference).abs().max().item() <= 1e-4
    finally:
        ac.remove(pipe.unet)
    # The phases are different graphs: a test that compared one graph twice would not see this.
    assert (outputs["prune-less"] - outputs["pruned"]).abs().max().item() > 1e-3


def test_sampling_switches_sessions_at_the_manifest_boundaries(built, pipe, reference, exported):
    _, manifest, _ = built
    unet = exported()
    sessions = {name: 0 for name in unet.engines}
    for name, engine in unet.engines.items():
        infer = engine.infer

        def counted(feed, name=name, infer=infer):
            sessions[name] += 1
            return infer(feed)

        engine.infer = counted
    image = _sample(pipe)
    assert sessions == {p.name: p.stop - p.start for p in manifest.phases} == {"prune-less": 1, "pruned": 3}
    assert [(c.step, c.phase) for c in unet.calls] == reference[1]
    assert np.abs(image - reference[0]).max() <= 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(steps=5), "5 sampling steps were asked for.*built for 4 steps"),
    (dict(height=128, width=128), r"sample \(2, 4, 16, 16\) \(expected \(2, 4, 32, 32\)\)"),
    (dict(guidance_scale=1.0), r"sample \(1, 4, 32, 32\) \(expected \(2, 4, 32, 32\)\).*batch 2"),
])
def test_mismatched_request_names_expected_and_given(pipe, exported, change, message):
    exported()
    with pytest.raises(ValueError, match=message):
        _sample(pipe, **change)


def test_opt_in_fallback_warns_and_runs_pytorch(pipe, exported):
    # 2 steps (the build has 4): the PyTorch runner's atedm schedule for 2 steps is 1 + 1.
    ac.apply(pipe, "atedm")
    reference = _sample(pipe, steps=2)
    ac.remove(pipe)
    unet = exported(fallback=pipe.unet, on_mismatch="fallback")
    with pytest.warns(UserWarning, match="2 sampling steps.*falling back to the PyTorch runner"):
        image = _sample(pipe, steps=2)
    assert [c.phase for c in unet.calls] == ["prune-less (pytorch)", "pruned (pytorch)"]
    assert np.array_equal(image, reference)
    ac.remove(unet.fallback)


def test_cli_check_and_run(built, tmp_path, capsys):
    from atedm_compile.cli import main

    assert main(["check", str(built[0])]) == 0
    out = capsys.readouterr().out
    assert "lint ok" in out and "engine vs ONNX Runtime: skipped" in out and "check passed" in out
    assert main(["run", str(built[0]), "--steps", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "steps: built 4, given 5" in capsys.readouterr().err
    assert main(["run", str(built[0]), "--out", str(tmp_path / "image.png")]) == 0
    out = capsys.readouterr().out
    assert "prune-less: steps 0-0, 1 calls" in out and "pruned: steps 1-3, 3 calls" in out
    assert (tmp_path / "image.png").stat().st_size > 0
    # Without guidance the built batch of 2 is two images: both written, numbered.
    assert main(["run", str(built[0]), "--guidance", "1", "--out", str(tmp_path / "two" / "y.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["y-0.png", "y-1.png"]
    first, second = (np.asarray(Image.open(tmp_path / "two" / f"y-{i}.png")) for i in range(2))
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_a_scheduler_swapped_in_after_attach_is_followed(built, pipe, reference, exported):
    from diffusers import EulerDiscreteScheduler

    unet = exported()
    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
    try:
        image = _sample(pipe)
    finally:
        pipe.scheduler = old
    assert [(c.step, c.phase) for c in unet.calls] == reference[1]
    assert np.abs(image - reference[0]).max() <= 1e-4


# The default's recovery and layer-delta in the default run; the other delta options (each with
# its eager reference in test_insert_token_pruning) export the same ops: slow.
@pytest.mark.parametrize("options", [pytest.param(dict(neighbours=3), marks=pytest.mark.slow),
                                     pytest.param(dict(cell=2), marks=pytest.mark.slow),
                                     pytest.param(dict(cell=2, fill="distinct"), marks=pytest.mark.slow),
                                     dict(recovery="layer-delta"), dict(recovery="merge-delta", cell=3, fill="distinct")])
def test_delta_recovery_phase_exports_and_passes_check(tmp_path, options):
    from atedm_compile.config import PruningConfig
    from atedm_compile.export import check

    pruning = PruningConfig(**{"recovery": "delta", "similarity": "key-cosine", **options})
    config = BuildConfig(model="tiny", schedule="uniform", num_steps=1, pruning=pruning)
    manifest, _ = build(config, tmp_path / "delta", log=lambda _: None)
    assert check(tmp_path / "delta", compare_engines=False, log=lambda _: None).ok
    model = onnx.load(str(tmp_path / "delta" / manifest.phases[0].onnx.file), load_external_data=False)
    assert "ScatterElements" in {n.op_type for n in model.graph.node}
    if pruning.cell > 1:
        assert "ArgMax" in {n.op_type for n in model.graph.node}
    unet = build_unet("tiny")
    ac.apply(unet, ac.make_schedule("uniform", 1), pruning).start(1)
    feed = example_inputs(manifest.phases[0].inputs, seed=3)
    expected = pytorch_latent(unet, feed)
    got = load(tmp_path / "delta", cpu_cache=False).engines[manifest.phases[0].name].infer(feed)["latent"]
    assert (got - expected).abs().max().item() <= 1e-4
