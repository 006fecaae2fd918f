import json
from pathlib import Path

import numpy as np

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

REPO = Path(__file__).resolve().parents[1]


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


def test_generate_removes_masks_an_unpruned_run_would_not_match(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "masks.png").is_file()
    assert main(["generate", "--model", "tiny", "--steps", "2", "--keep-ratio", "1", "--out", str(tmp_path)]) == 0
    assert "no masks; removed the earlier masks.png" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]


@pytest.mark.parametrize("argv,message", [
    (["flops", "--model", "tiny", "--keep-ratio", "1.5"], "keep_ratio=1.5 is outside (0, 1]"),
    (["flops", "--model", "sdxl-huge"], "unknown model config 'sdxl-huge'"),
    (["flops", "--model", "tiny", "--height", "1000000"], "image size 1000000x1000000 px is too large to count"),
    (["flops", "--model", "tiny", "--target-tflops", "0.0019", "--schedule", "none"],
     "preset 'none' prunes nothing, whatever the keep ratio: it costs the full model's 0.002212 TMACs"),
    (["flops", "--model", "tiny", "--target-tflops", "0.0001"], "target 0.0001 TMACs is below what preset 'atedm'"),
    (["generate", "--steps", "2", "--height", "72"], "image size 72x72 px is not a positive multiple of 16"),
    (["generate", "--model", "sdxl-base"], "'sdxl-base' is a bare U-Net config"),
    (["generate", "--model", str(REPO / "README.md")], "README.md' is a file"),
    (["generate", "--model", "no-such-model"], "cannot load model 'no-such-model': not a folder here, nor a hub id"),
    (["generate", "--model", str(REPO / "docs")], "docs': a folder here, but not a diffusers pipeline"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] == "generate" else [])) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_seed_no_generator_takes_is_refused_by_name(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--seed", "99999999999999999999", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --seed: 99999999999999999999 is outside the seeds a generator takes" in capsys.readouterr().err
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


@pytest.mark.parametrize("command", ["generate", "run"])
def test_output_path_is_checked_before_any_model_loads(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("atedm_compile.models.load_pipeline", lambda *_, **__: pytest.fail("a model was loaded"))
    target = tmp_path / "out"
    target.write_text("mine")
    if command == "generate":
        argv, message = ["generate", "--model", "tiny", "--steps", "1", "--out", str(target)], "is not a folder"
    else:  # the build directory does not even need to exist: the output is checked first
        argv, message = ["run", str(tmp_path / "build"), "--out", str(target / "image.png")], "is not a folder"
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert target.read_text() == "mine"


@pytest.mark.parametrize("model,size", [("tiny-shapes", 64), ("tiny", 256)])
def test_flops_default_to_the_models_own_size(capsys, model, size):
    assert main(["flops", "--model", model, "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["height"], out["width"]) == (size, size)


def test_help_describes_every_option_with_its_default_and_examples():
    import argparse

    from atedm_compile.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "flops" in top and "build" in top and "check" in top and "examples:" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"flops", "generate", "build", "run", "check", "evaluate"}
    for name, command in commands.items():
        text = command.format_help()
        assert "example" in text, name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            # A default written into the help text and added by the formatter shows twice.
            shown = command._get_formatter()._expand_help(action) if action.help != "==SUPPRESS==" else ""
            assert shown.count("(default:") <= 1, f"{name} {action.option_strings}: {shown!r}"
    generate = commands["generate"].format_help()
    assert "sampling steps, 1 to 1000 (default: 50)" in generate and "(default: tiny-shapes)" in generate
    assert "(default: None)" not in generate
    assert "(default: out/image.png)" in commands["run"].format_help()


def test_loading_a_pipeline_folder_is_quiet(tmp_path, capfd):
    from atedm_compile.models import tiny_sdxl_pipeline

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "pipe")
    capfd.readouterr()
    assert main(["generate", "--model", str(tmp_path / "pipe"), "--steps", "1", "--schedule", "uniform",
                 "--out", str(tmp_path / "out")]) == 0
    err = capfd.readouterr().err
    for noise in ("accelerate", "deprecated", "Loading pipeline components", "Loading weights", "Warning"):
        assert noise not in err, err


@pytest.mark.slow  # 10 s; the Triton map itself is checked in test_triton_map
def test_generate_with_the_triton_map_draws_what_the_cpu_path_draws(tmp_path, capsys, monkeypatch):
    # Under Triton's interpreter (conftest.py) when Triton is installed; the same kept tokens and
    # the same image as the per-head loop, to rounding.
    from atedm_compile import triton_map

    if not triton_map.available("cpu"):
        pytest.skip("Triton is not installed (the [dev] extra has it on Linux x86-64)")
    calls, kernel = [], triton_map.head_map
    monkeypatch.setattr(triton_map, "head_map", lambda *args: calls.append(args[0].shape) or kernel(*args))
    images = {}
    for path in ("per-head", "triton"):
        argv = ["generate", "--steps", "3", "--attention-map", path, "--out", str(tmp_path / path)]
        assert main(argv) == 0
        images[path] = np.asarray(Image.open(tmp_path / path / "image.png"), dtype=np.int16)
    assert np.abs(images["triton"] - images["per-head"]).max() <= 1
    assert len(calls) > 0  # the kernel made the maps


def test_generate_refuses_the_triton_map_where_it_cannot_run(tmp_path, capsys, monkeypatch):
    from atedm_compile import triton_map

    monkeypatch.setattr(triton_map, "available", lambda device: False)
    assert main(["generate", "--attention-map", "triton", "--out", str(tmp_path / "out")]) == 2
    assert "--attention-map triton needs Triton and a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
