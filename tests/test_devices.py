import pytest
import torch
from PIL import Image

from atedm_compile.cli import main
from atedm_compile.devices import Stopwatch, cast, resolve_device, resolve_dtype
from atedm_compile.models import load_pipeline

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")


def test_cpu_and_dtypes_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_a_missing_gpu_is_named(name):
    with pytest.raises(ValueError, match=f"device '{name}' is not available here"):
        resolve_device(name)


@pytest.mark.parametrize("name,message", [("tpu", "'tpu' is not a device name"),
                                          ("meta", "'meta' is not supported")])
def test_unknown_devices(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_unknown_dtype():
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not one of \['fp32', 'fp16', 'bf16'\]"):
        resolve_dtype("fp8")


def test_cast_is_in_place_and_quiet(tiny_unet, capfd):
    unet = type(tiny_unet).from_config(tiny_unet.config)
    capfd.readouterr()
    assert cast(unet, dtype=torch.bfloat16) is unet
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert "kept in float32" not in capfd.readouterr().err  # what diffusers' own .to(dtype) prints


def test_stopwatch_times_each_span_on_the_cpu():
    watch = Stopwatch(torch.device("cpu"))
    for _ in range(3):
        with watch:
            torch.ones(64, 64) @ torch.ones(64, 64)
    times = watch.milliseconds()
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_tiny_pipeline_in_bf16():
    pipe = load_pipeline("tiny", torch.bfloat16, "cpu")
    assert {c.dtype for c in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.bfloat16}


@no_cuda
def test_generate_on_a_missing_gpu_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--device", "cuda", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "device 'cuda' is not available here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_in_bf16(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--dtype", "bf16", "--steps", "2", "--height", "128",
                 "--out", str(tmp_path)]) == 0
    assert "seconds per step" in capsys.readouterr().out
    assert Image.open(tmp_path / "image.png").size == (128, 128)
