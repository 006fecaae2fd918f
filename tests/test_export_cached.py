"""A schedule with cached steps (DeepCache's rule) exported per phase: a full-step graph that also
returns the deep features and a cached-step graph that takes them; the build passes ``check``, and
sampling with it equals the PyTorch runner with the same schedule and cache.

One build for the module: the tiny SD-XL U-Net, ``atedm``, 4 steps at 128 px, interval 2 at branch
1 (phases prune-less at step 0, pruned at steps 1-3; steps 1 and 3 cached).
"""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

import atedm_compile as ac
from atedm_compile.caching import features_shape, step_roles
from atedm_compile.cli import main
from atedm_compile.config import DeepCacheConfig
from atedm_compile.export import BuildConfig, build, check, load
from atedm_compile.export.manifest import MANIFEST, ManifestError, read_manifest
from atedm_compile.models import tiny_sdxl_pipeline

STEPS, SIZE = 4, 128
CACHE = DeepCacheConfig(interval=2, branch=1)
CONFIG = BuildConfig(model="tiny", schedule="atedm", num_steps=STEPS, height=SIZE, width=SIZE, cache=CACHE)


@pytest.fixture(scope="module")
def cached_build(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cached") / "tiny"
    manifest, records = build(CONFIG, directory, log=lambda _: None)
    return directory, manifest, records


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


def _sample(pipe, steps=STEPS):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cube", num_inference_steps=steps, height=SIZE, width=SIZE, generator=generator,
                output_type="np").images


def test_each_phase_has_a_full_graph_and_a_cached_one_where_steps_are_cached(cached_build):
    directory, manifest, _ = cached_build
    assert [(p.name, p.role, p.start, p.stop) for p in manifest.phases] == [
        ("prune-less", "full", 0, 1), ("pruned", "full", 1, 4), ("pruned.cached", "cached", 1, 4)]
    assert manifest.schedule["cache"] == {"interval": 2, "branch": 1, "spacing": "uniform", "power": 1.4,
                                          "center": 15, "forecast": "none"}
    unet_config = manifest.model["config"]
    features = features_shape(unet_config, CACHE.branch, manifest.batch, *manifest.latent)
    for entry in manifest.phases:
        graph = onnx.load(str(directory / entry.onnx.file), load_external_data=False).graph
        inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
        base = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        if entry.role == "full":
            assert inputs == base and outputs == ["latent", "deep_features"]
            assert entry.outputs["deep_features"].shape == features
        else:
            # The manifest lists what the graph takes: here (branch 1 of the tiny U-Net cuts below its
            # first cross-attention stage) no encoder_hidden_states.
            assert inputs == list(entry.inputs) == ["sample", "timestep", "text_embeds", "time_ids", "deep_features"]
            assert outputs == ["latent"]
            assert entry.inputs["deep_features"].shape == features
        shape = next(o for o in graph.output if o.name == "latent").type.tensor_type.shape
        assert [d.dim_value for d in shape.dim] == list(entry.outputs["latent"].shape)
    # The full and cached graphs of a phase differ (export keys, and the cached one holds less).
    full, cached = manifest.phase("pruned"), manifest.phase("pruned.cached")
    assert full.export_key != cached.export_key
    assert cached.onnx.bytes < full.onnx.bytes


def test_cached_build_passes_check(cached_build, capsys):
    directory = cached_build[0]
    report = check(directory, compare_engines=False, log=lambda _: None)
    assert report.ok and [p.name for p in report.phases] == ["prune-less", "pruned", "pruned.cached"]
    assert main(["check", str(directory), "--no-tensorrt"]) == 0
    assert "pruned.cached (cached steps 1-3)" in capsys.readouterr().out


def test_sampling_equals_the_pytorch_runner_with_the_same_cache(cached_build, pipe):
    runner = ac.apply(pipe, "atedm", cache=CACHE)
    try:
        expected = _sample(pipe)
        expected_calls = [(c.step, c.phase, c.role) for c in runner.calls]
    finally:
        ac.remove(pipe)
    unet = load(cached_build[0]).attach(pipe)
    try:
        got = _sample(pipe)
        calls = [(c.step, c.phase, c.role) for c in unet.calls]
        again = _sample(pipe)  # a second run starts afresh: no features carried over
    finally:
        unet.detach(pipe)
    assert calls == expected_calls == [(0, "prune-less", "full"), (1, "pruned", "cached"), (2, "pruned", "full"),
                                       (3, "pruned", "cached")]
    assert [c[2] for c in calls] == list(step_roles(CACHE, STEPS))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(again, got)
    assert np.abs(got - _sample(pipe)).max() > 1e-3  # the cached steps and the pruning changed the image


def test_fallback_runs_the_pytorch_runner_with_the_cache(cached_build, pipe):
    runner = ac.apply(pipe, "atedm", cache=CACHE)
    try:
        expected = _sample(pipe, steps=6)
        expected_calls = [(c.step, c.phase + " (pytorch)", c.role) for c in runner.calls]
    finally:
        ac.remove(pipe)
    unet = load(cached_build[0], fallback=pipe.unet, on_mismatch="fallback").attach(pipe)
    try:
        with pytest.warns(UserWarning, match="6 sampling steps were asked for"):
            got = _sample(pipe, steps=6)
        assert [(c.step, c.phase, c.role) for c in unet.calls] == expected_calls
    finally:
        unet.detach(pipe)
        ac.remove(pipe)  # the fallback runner's, on the pipeline's own U-Net
    np.testing.assert_array_equal(got, expected)


def test_the_first_call_of_a_run_is_full_and_features_are_reset(cached_build):
    from atedm_compile.export.onnx import example_inputs

    unet = load(cached_build[0])
    feed = example_inputs(unet.manifest.phase("pruned").inputs)
    text = (feed["timestep"], feed["encoder_hidden_states"],
            {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]})
    later = feed["sample"] * 0.5
    unet.start(STEPS)
    unet.set_step(1)  # a cached step, but nothing is cached yet (img2img starting there)
    unet(feed["sample"], *text)
    unet.set_step(3)
    cached = unet(later, *text).sample  # on the deep features of the call before
    assert [(c.step, c.phase, c.role) for c in unet.calls] == [(1, "pruned", "full"), (3, "pruned", "cached")]
    unet.start(STEPS)  # a new run: the features are gone, its first call is full
    unet.set_step(3)
    fresh = unet(later, *text).sample
    assert [(c.step, c.phase, c.role) for c in unet.calls] == [(3, "pruned", "full")]
    assert (fresh - cached).abs().max() > 1e-4  # the cached call read the earlier call's features


def test_cli_run_times_full_and_cached_calls_apart(cached_build, tmp_path, capsys):
    assert main(["run", str(cached_build[0]), "--out", str(tmp_path / "image.png")]) == 0
    printed = capsys.readouterr().out
    assert "pruned: steps 2-2, 1 calls" in printed and "pruned (cached): steps 1-3, 2 calls" in printed
    assert (tmp_path / "image.png").is_file()


@pytest.mark.slow
def test_cli_build_with_cached_steps(tmp_path, capsys):
    out = tmp_path / "build"
    argv = ["build", "--model", "tiny", "--steps", "3", "--height", "64", "--width", "64", "--schedule", "uniform",
            "--cache-interval", "2", "--cache-branch", "0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pruned (full steps)" in printed and "pruned.cached (cached steps)" in printed
    manifest = read_manifest(out)
    assert manifest.schedule["cache"]["interval"] == 2 and manifest.schedule["cache"]["branch"] == 0
    assert check(out, compare_engines=False, log=lambda _: None).ok


def test_rebuild_with_another_interval_reuses_the_graphs(cached_build, tmp_path):
    # The graphs depend on the branch, not on which steps are cached: interval 3 caches steps 1
    # and 2 of 4, the same graphs.
    directory = tmp_path / "copy"
    shutil.copytree(cached_build[0], directory)
    config = BuildConfig(**{**CONFIG.__dict__, "cache": DeepCacheConfig(interval=3, branch=1)})
    manifest, records = build(config, directory, log=lambda _: None)
    assert not any(r.ran for r in records if r.name.startswith("export ONNX"))
    assert [p.export_key for p in manifest.phases] == [p.export_key for p in cached_build[1].phases]
    assert check(directory, compare_engines=False, log=lambda _: None).ok


def test_a_build_with_the_linear_forecast_samples_as_the_pytorch_runner(cached_build, pipe, tmp_path):
    # The same graphs (the forecast is computed between calls); step 3 reads the line through the
    # features of steps 0 and 2.
    directory = tmp_path / "forecast"
    shutil.copytree(cached_build[0], directory)
    cache = DeepCacheConfig(interval=2, branch=1, forecast="linear")
    manifest, records = build(BuildConfig(**{**CONFIG.__dict__, "cache": cache}), directory, log=lambda _: None)
    assert not any(r.ran for r in records if r.name.startswith("export ONNX"))
    assert manifest.schedule["cache"]["forecast"] == "linear"

    def latents():
        generator = torch.Generator().manual_seed(0)
        return pipe("a red cube", num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator,
                    output_type="latent").images

    ac.apply(pipe, "atedm", cache=cache)
    try:
        expected = latents()
    finally:
        ac.remove(pipe)
    results = {}
    for name, folder in (("linear", directory), ("none", cached_build[0])):
        unet = load(folder).attach(pipe)
        try:
            results[name] = latents()
        finally:
            unet.detach(pipe)
    torch.testing.assert_close(results["linear"], expected, atol=1e-4, rtol=0)  # fp32, ONNX Runtime against PyTorch
    # Not the build that reuses the features as they are.
    assert (results["linear"] - results["none"]).abs().max() > 100 * (results["linear"] - expected).abs().max()


@pytest.mark.parametrize("change, message", [
    ({"interval": 1}, "'pruned.cached' is not a phase of schedule 'atedm'"),  # no cached steps: no such graph
    ({"spacing": "non-uniform"}, "center=15 is not allowed for a 4-step run"),
    ({"branch": 9}, "branch=9 is not allowed"),
])
def test_a_manifest_whose_cache_does_not_give_its_graphs_is_refused(cached_build, tmp_path, change, message):
    directory = tmp_path / "copy"
    shutil.copytree(cached_build[0], directory)
    data = json.loads((directory / MANIFEST).read_text())
    data["schedule"]["cache"].update(change)
    (directory / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(directory)


def test_a_build_without_cache_writes_no_cache_fields(built):
    data = json.loads((built[0] / MANIFEST).read_text())
    assert "cache" not in data["schedule"]
    assert all("role" not in phase for phase in data["phases"])
    assert [p.role for p in built[1].phases] == [None, None]


@pytest.mark.parametrize("options, message", [
    (["--cache-interval", "0"], "interval=0 is not allowed: must be an integer in [1, 1000]"),
    (["--cache-interval", "2", "--cache-branch", "9"],
     "branch=9 is not allowed: this U-Net's 3 down stages of 2 layers and a downsampler give branches 0 to 8"),
    (["--cache-branch", "1"], "--cache-branch set without --cache-interval"),
    (["--cache-interval", "2", "--cache-spacing", "non-uniform", "--steps", "10"],
     "center=15 is not allowed for a 10-step run"),
    (["--cache-interval", "2", "--cache-power", "1"], "power=1.0 is not allowed"),
])
def test_bad_cache_values_are_one_line_and_write_nothing(options, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", "--out", str(out)] + options) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()
