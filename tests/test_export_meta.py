"""Export without computing: each phase graph is traced on meta tensors and its weights are
streamed into ``weights.bin``; the graphs equal the TorchScript exporter's on the real U-Net, the
build refuses up front what its memory cannot hold."""

import collections

import numpy as np
import onnx
import pytest
import torch

import atedm_compile as ac
from atedm_compile.cli import main
from atedm_compile.export import BuildConfig, build
from atedm_compile.export.manifest import WEIGHTS
from atedm_compile.export.onnx import WeightStore, content_key, example_inputs, export_phase, share_weights
from atedm_compile.models import build_unet


def _ops(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("phase", ["pruned", pytest.param("prune-less", marks=pytest.mark.slow)])
def test_meta_export_equals_the_exporter_run_on_the_real_unet(built, tmp_path, phase):
    # The build's graphs were traced on meta tensors (the pruned one holds the pruning modules' TopK,
    # GatherElements, ScatterElements); the reference runs the TorchScript exporter on the real
    # U-Net, as builds did.
    import onnxruntime as ort

    directory, manifest, _ = built
    entry = manifest.phase(phase)
    unet = build_unet("tiny")
    runner = ac.apply(unet, ac.make_schedule(manifest.schedule["preset"], manifest.num_steps))
    try:
        runner.start(manifest.num_steps)
        runner.use_phase(entry.name)
        export_phase(unet, entry.inputs, tmp_path / "raw.onnx")
    finally:
        ac.remove(unet)
    reference = share_weights(onnx.load(str(tmp_path / "raw.onnx")), WeightStore(tmp_path / WEIGHTS))
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    exported = onnx.load(str(directory / entry.onnx.file), load_external_data=False)
    assert _ops(exported) == _ops(reference)
    if phase == "pruned":
        assert {"TopK", "GatherElements", "ScatterElements"} <= set(_ops(exported))
    feed = {name: value.numpy() for name, value in example_inputs(entry.inputs, seed=3).items()}
    got = ort.InferenceSession(str(directory / entry.onnx.file)).run(None, feed)[0]
    expected = ort.InferenceSession(str(tmp_path / "reference.onnx")).run(None, feed)[0]
    assert np.abs(got - expected).max() <= 1e-5
    # The same tensors, stored once each, and nothing more.
    assert (directory / WEIGHTS).stat().st_size == (tmp_path / WEIGHTS).stat().st_size


@pytest.mark.slow
def test_the_export_never_runs_the_unet_on_real_tensors(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []
    forward = UNet2DConditionModel.forward

    def counting(self, sample, *args, **kwargs):
        calls.append(sample.device.type)
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    manifest, _ = build(BuildConfig(model="tiny", schedule="none", num_steps=2), tmp_path / "b", log=lambda _: None)
    assert calls and set(calls) == {"meta"}
    assert manifest.complete


def test_a_failed_stream_leaves_the_weights_file_and_index_as_they_were(tmp_path):
    store = WeightStore(tmp_path / WEIGHTS)
    first = np.full((64, 64), 1.0, dtype=np.float32)
    store.add([(content_key(first), "unet.a", first)])
    size, index = (tmp_path / WEIGHTS).stat().st_size, dict(store.index)

    def arrays():
        yield "unet.b", np.full((64, 64), 2.0, dtype=np.float32)
        raise RuntimeError("made half of the weights")

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(RuntimeError, match="half"):
        share_weights(model, store, arrays=arrays())
    assert store.index == index and (tmp_path / WEIGHTS).stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS]


def test_fp16_config_models_are_drawn_at_fp16():
    from atedm_compile.export.build import _load_unet

    unet = _load_unet("tiny", 0, "fp16", "cpu")
    again = _load_unet("tiny", 0, "fp16", "cpu")
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), again.parameters()))
    assert torch.get_default_dtype() == torch.float32


def test_a_build_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib

    build_memory = importlib.import_module("atedm_compile.export.build_memory")
    monkeypatch.setattr(build_memory, "memory_limit", lambda device="cpu": (2**30, "a 1 GiB test limit"))
    out = tmp_path / "out"
    assert main(["build", "--model", "sdxl-base", "--precision", "fp16", "--height", "1024", "--width", "1024",
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "needs about 6.4 GiB" in error and "weights 4.78" in error and "1.0 GiB of a 1 GiB test limit" in error
    assert not out.exists()


def test_the_memory_estimate_counts_the_weights_at_the_chosen_precision():
    from atedm_compile.export.build import EXPORT_OVERHEAD, _meta_unet, build_memory

    unet = _meta_unet(build_unet("tiny", device="meta").config, "fp32")
    params = sum(p.numel() for p in unet.parameters())
    fp32 = build_memory(unet, BuildConfig(model="tiny"), 0)
    fp16 = build_memory(_meta_unet(dict(unet.config), "fp16"), BuildConfig(model="tiny", precision="fp16"), 0)
    assert fp32["weights"] == 4 * params and fp16["weights"] == 2 * params
    assert fp32["exporter"] == EXPORT_OVERHEAD
    assert "activations" in build_memory(unet, BuildConfig(model="tiny", exporter="dynamo"), 123)


@pytest.mark.slow
def test_verify_compares_each_phase_with_pytorch(tmp_path, monkeypatch):
    from atedm_compile.export.onnxruntime import OrtEngine

    logged = []
    config = BuildConfig(model="tiny", schedule="none", num_steps=2, verify=True)
    build(config, tmp_path / "b", log=logged.append)
    assert any(line.startswith("verify: full: ONNX Runtime matches PyTorch") for line in logged), logged
    infer = OrtEngine.infer
    monkeypatch.setattr(OrtEngine, "infer", lambda self, feed: {k: v + 0.1 * v.abs().max()
                                                               for k, v in infer(self, feed).items()})
    with pytest.raises(ValueError, match="differs from PyTorch"):
        build(config, tmp_path / "b", log=lambda _: None)
