import json

import pytest
from PIL import Image

from atedm_compile.cli import main


def test_flops_json(capsys):
    assert main(["flops", "--model", "tiny", "--height", "256", "--width", "256", "--steps", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["phases"]) == {"prune-less", "pruned"}
    assert out["full_tmacs"] > out["phases"]["prune-less"]["tmacs"] > out["phases"]["pruned"]["tmacs"] > 0
    assert out["average_tmacs"] == pytest.approx(
        (3 * out["phases"]["prune-less"]["tmacs"] + 7 * out["phases"]["pruned"]["tmacs"]) / 10, abs=1e-4)
    for phase in out["phases"].values():
        assert phase["tmacs_with_scoring"] >= phase["tmacs"]


def test_flops_target(capsys):
    assert main(["flops", "--model", "tiny", "--height", "256", "--width", "256", "--schedule", "uniform",
                 "--steps", "1", "--target-tflops", "0.0018"]) == 0
    assert "keep ratio for an average of at most 0.0018 TMACs per step" in capsys.readouterr().out


@pytest.mark.parametrize("model,size", [("tiny-shapes", 64), ("tiny", 256)])
def test_generate_writes_image_and_masks(tmp_path, capsys, model, size):
    assert main(["generate", "--model", model, "--steps", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prune-less" in out and "seconds per step" in out
    assert Image.open(tmp_path / "image.png").size == (size, size)
    assert Image.open(tmp_path / "masks.png").size[0] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "masks.png"]


@pytest.mark.parametrize("argv,message", [
    (["flops", "--model", "tiny", "--keep-ratio", "1.5"], "keep_ratio=1.5 is outside (0, 1]"),
    (["flops", "--model", "sdxl-huge"], "unknown model config 'sdxl-huge'"),
    (["generate", "--steps", "2", "--height", "72"], "image size 72x72 is not a positive multiple of 16"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "generate" else [])) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_flops_of_the_shipped_model_use_its_vae_factor(capsys):
    assert main(["flops", "--model", "tiny-shapes", "--height", "64", "--width", "64", "--steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # latent 16 x 16 (VAE factor 4): the same cost generate reports for 64 px
    from atedm_compile.flops import count_phases
    from atedm_compile.models import build_unet
    from atedm_compile.schedule import make_schedule

    expected = count_phases(build_unet("tiny-shapes", device="meta"), make_schedule("none", 1), height=64, width=64,
                            vae_factor=4).full_tmacs
    assert out["full_tmacs"] == pytest.approx(expected, abs=1e-4)
    assert out["full_tmacs"] > 3e-4


def test_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("mine")
    assert main(["generate", "--model", "tiny", "--steps", "1", "--out", str(target)]) == 2
    assert "File exists" in capsys.readouterr().err
    assert target.read_text() == "mine"


@pytest.mark.parametrize("model,size", [("tiny-shapes", 64), ("tiny", 256)])
def test_flops_default_to_the_models_own_size(capsys, model, size):
    assert main(["flops", "--model", model, "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["height"], out["width"]) == (size, size)
