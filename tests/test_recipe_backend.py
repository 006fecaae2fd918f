"""The backend recipe of docs/architecture.md, tried: a toy backend (each phase graph copied as
its own "engine" by a build stage, run in a plain, unoptimised ONNX Runtime session) added by one entry in
``export.BACKENDS``, built, checked and sampled with on the tiny model; and the runtime's rules
for a run (``runtime.plan_run``), which the ``run`` command only reports."""

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from export_build import CONFIG

from atedm_compile.export import BACKENDS, Backend, BuildConfig, ManifestError, build, check, load
from atedm_compile.export.extras import UnavailableError
from atedm_compile.export.onnx import example_inputs
from atedm_compile.export.runtime import plan_run
from atedm_compile.export.stages import BuildStage
from atedm_compile.files import write_atomically


class PlainEngine:
    """One graph in an ONNX Runtime session of its own, without graph optimisation (its weights read
    from weights.bin by ONNX Runtime itself): named torch tensors in and out."""

    def __init__(self, path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(self, feed):
        names = [i.name for i in self.session.get_inputs()]
        arrays = {name: feed[name].detach().cpu().numpy() for name in names}
        outputs = [o.name for o in self.session.get_outputs()]
        return {name: torch.from_numpy(value) for name, value in zip(outputs, self.session.run(outputs, arrays))}


class PlainBackend(Backend):
    name = "toy-plain"
    title = "plain ONNX Runtime"
    extra = "onnx"
    modules = ("onnxruntime",)

    def phase_stages(self, plan, entry):
        return [BuildStage(f"plain copy: {entry.name}", partial(self._made, plan, entry),
                           partial(self._make, plan, entry))]

    @staticmethod
    def _file(entry):
        return f"{entry.name}.plain.onnx"  # beside weights.bin, where its external data points

    def _made(self, plan, entry):
        if entry.engine and entry.engine_key == entry.onnx.sha256 and (plan.directory / entry.engine.file).is_file():
            return f"{entry.engine.file} is up to date"
        return None

    def _make(self, plan, entry):
        write_atomically(plan.directory / self._file(entry), (plan.directory / entry.onnx.file).read_bytes())
        plan.record_engine(entry, self._file(entry), entry.onnx.sha256)

    def artefacts(self, entry):
        return [entry.engine]

    def load(self, directory, manifest, **options):
        return {p.name: PlainEngine(directory / p.engine.file) for p in manifest.phases}

    def compare(self, directory, entry, precision):
        from atedm_compile.export.onnxruntime import OrtEngine

        # The build's graph through the onnxruntime backend's engine, unoptimised as here (optimising
        # takes seconds a session); sampling below compares with the optimised one.
        feed = example_inputs(entry.inputs, seed=3)
        ours = PlainEngine(directory / entry.engine.file).infer(feed)
        theirs = OrtEngine(directory / entry.onnx.file, optimized=True).infer(feed)
        return all(torch.allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-4) for name in theirs)


@pytest.fixture
def toy(monkeypatch):
    backend = PlainBackend()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    return backend


def test_a_backend_added_to_the_table_builds_checks_and_samples(built, copy_of, toy, tiny_pipe):
    manifest, records = build(replace(CONFIG, backend=toy.name), copy_of, log=lambda _: None)
    # The same settings as the shared build: its graphs are kept, only the backend's stages run.
    assert [r.name for r in records if r.ran] == [f"plain copy: {p.name}" for p in manifest.phases] + ["manifest"]
    assert [p.onnx for p in manifest.phases] == [p.onnx for p in built[1].phases]
    assert manifest.backend == toy.name and all(p.engine.file == f"{p.name}.plain.onnx" for p in manifest.phases)
    assert [p.engine for p in check(copy_of, log=lambda _: None).phases] == ["matches"] * len(manifest.phases)

    prompt = dict(prompt="a red cube", num_inference_steps=CONFIG.num_steps, height=manifest.height,
                  width=manifest.width, output_type="np")
    images = {}
    for directory in (copy_of, built[0]):
        unet = load(directory).attach(tiny_pipe)
        try:
            images[directory] = tiny_pipe(**prompt, generator=torch.Generator().manual_seed(0)).images
        finally:
            unet.detach(tiny_pipe)
        if directory == copy_of:
            assert all(isinstance(engine, PlainEngine) for engine in unet.engines.values())
            assert [c.phase for c in unet.calls] == ["prune-less", "pruned", "pruned", "pruned"]
    np.testing.assert_allclose(images[copy_of], images[built[0]], atol=1e-3)

    # What the backend built is hashed in the manifest like the graphs: an altered copy is refused.
    engine = copy_of / manifest.phases[0].engine.file
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(ManifestError, match="was altered"):
        load(copy_of)


def test_an_unknown_backend_is_refused_naming_the_allowed_ones(built):
    with pytest.raises(ValueError, match=r"backend='nope' is not allowed; choose one of \['onnxruntime', 'tensorrt'\]"):
        BuildConfig(backend="nope")
    with pytest.raises(ValueError, match="backend='nope' is not allowed"):
        load(built[0], backend="nope")


def test_the_run_plan_takes_the_build_defaults_and_refuses_what_it_does_not_cover(built, toy):
    directory, manifest, _ = built
    request = plan_run(directory, manifest)
    assert (request.steps, request.height, request.width) == (manifest.num_steps, manifest.height, manifest.width)
    assert request.images == manifest.batch // 2 and request.unet_batch == manifest.batch
    assert request.backend is BACKENDS[manifest.backend]
    assert plan_run(directory, manifest, guidance=1.0).images == manifest.batch  # no guidance: one call per image
    assert plan_run(directory, manifest, backend=toy.name).backend is toy
    with pytest.raises(ValueError, match=r"steps: built 4, given 5.*--fallback-pytorch"):
        plan_run(directory, manifest, steps=5)
    assert plan_run(directory, manifest, steps=5, fallback=True).steps == 5
    with pytest.raises(ValueError, match=r"size: built \d+x\d+ px, given 64x64 px"):
        plan_run(directory, manifest, height=64)
    with pytest.raises(ValueError, match="execution providers"):
        plan_run(directory, manifest, providers=["no-such-provider"])


@pytest.mark.skipif(BACKENDS["tensorrt"].missing() is None, reason="TensorRT runs here")
def test_a_run_on_a_backend_that_cannot_run_here_says_what_is_missing(built):
    with pytest.raises(UnavailableError, match="tensorrt"):
        plan_run(built[0], built[1], backend="tensorrt")
