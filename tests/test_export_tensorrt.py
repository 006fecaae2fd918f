"""The TensorRT backend. Everything but the preflight needs TensorRT, polygraphy and a CUDA GPU
and skips with the reason where they are absent."""

import pytest

from atedm_compile.export import BuildConfig, build, check, load
from atedm_compile.export.tensorrt import tensorrt_missing_reason

MISSING = tensorrt_missing_reason()
needs_tensorrt = pytest.mark.skipif(MISSING is not None, reason=f"TensorRT path unavailable: {MISSING}")


@pytest.mark.skipif(MISSING is None, reason="TensorRT is present: the preflight passes")
def test_build_fails_before_exporting_without_tensorrt(tmp_path):
    with pytest.raises(RuntimeError, match="tensorrt"):
        build(BuildConfig(model="tiny", num_steps=4, backend="tensorrt"), tmp_path / "trt", log=lambda _: None)
    assert not (tmp_path / "trt").exists() or not any((tmp_path / "trt").glob("*.onnx"))


@pytest.fixture(scope="module")
def trt_build(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trt") / "tiny"
    manifest, records = build(BuildConfig(model="tiny", num_steps=4, backend="tensorrt", precision="fp16"),
                              directory, log=lambda _: None)
    return directory, manifest, records


@needs_tensorrt
def test_engines_are_built_per_phase_and_cached(trt_build):
    directory, manifest, records = trt_build
    assert all(p.engine is not None and (directory / p.engine.file).is_file() for p in manifest.phases)
    assert all(p.engine_key[:16] in p.engine.file for p in manifest.phases)
    _, again = build(BuildConfig(model="tiny", num_steps=4, backend="tensorrt", precision="fp16"), directory,
                     log=lambda _: None)
    assert [r.name for r in again if r.ran] == ["manifest"]


@needs_tensorrt
def test_tensorrt_matches_onnxruntime(trt_build):
    report = check(trt_build[0], log=lambda _: None)
    assert [p.engine for p in report.phases] == ["matches"] * len(report.phases)


@needs_tensorrt
def test_sampling_switches_engines(trt_build):
    from atedm_compile.models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline().to("cuda")
    unet = load(trt_build[0], cuda_graphs=True).attach(pipe)
    pipe("a red cube", num_inference_steps=4, height=256, width=256)
    assert [c.phase for c in unet.calls] == ["prune-less", "pruned", "pruned", "pruned"]
