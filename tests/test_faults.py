"""Bad input gets exit status 2, one line on stderr naming the problem, no traceback and nothing
written; Ctrl-C exits 130 the same way; two builds into one folder end as one valid build.

Argument and config validation is tested in-process (fast); a representative set goes through the
CLI as subprocesses (``python -m atedm_compile.cli`` from this checkout), started together.
"""

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atedm_compile.cli import main
from atedm_compile.config import PruningConfig

ROOT = Path(__file__).resolve().parents[1]


def _one_line(err: str, message: str) -> None:
    # The sampling progress bar, where sampling began, is no error line.
    lines = [line for line in err.strip().splitlines() if not re.match(r"sampling: +\d+%", line)]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


# -- in-process ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["generate", "--height", "0"], "argument --height: '0' is not an integer >= 1"),
    (["generate", "--width", "-8"], "argument --width: '-8' is not an integer >= 1"),
    (["generate", "--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["generate", "--guidance", "1e308"], "argument --guidance: '1e308' is outside the guidance scales taken, [0, 100]"),
    (["generate", "--guidance", "-1"], "argument --guidance: '-1' is outside the guidance scales taken, [0, 100]"),
    (["run", "build", "--guidance", "1e20"], "argument --guidance: '1e20' is outside the guidance scales taken"),
    (["evaluate", "--model", "m", "--captions", "c", "--out", "o", "--guidance", "7", "101"],
     "argument --guidance: '101' is outside the guidance scales taken, [0, 100]"),
    (["generate", "--prompt", "caf\udce9"], "argument --prompt: 'caf\\udce9' is not valid UTF-8 text"),
    (["generate", "--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
    (["run", "build", "--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
    (["generate", "--steps", "1000000000000"], "argument --steps: '1000000000000' is more than the 1000 sampling "
                                               "steps taken"),
    (["run", "build", "--steps", "1001"], "argument --steps: '1001' is more than the 1000 sampling steps taken"),
    (["evaluate", "--model", "m", "--captions", "c", "--out", "o", "--steps", "10000"],
     "argument --steps: '10000' is more than the 1000 sampling steps taken"),
    (["run", "build", "--images", "0"], "argument --images: '0' is not an integer >= 1"),
    (["flops", "--target-tflops", "nan"], "argument --target-tflops: 'nan' is not a finite number"),
    (["flops", "--target-tflops", "-1"], "argument --target-tflops: '-1' is not a number > 0"),
    (["build", "--out", "x", "--opset", "5"], "argument --opset: invalid choice: 5 (choose from 14, 15"),
    (["build", "--out", "x", "--batch", "0"], "argument --batch: '0' is not an integer >= 1"),
    (["build", "--out", "x", "--optimization-level", "9"], "argument --optimization-level: invalid choice: 9"),
])
def test_bad_arguments_are_one_line_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_line(capsys.readouterr().err, message)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--iterations", "1000000000"],
     "iterations=1000000000 is not allowed: must be an integer in [1, 100]"),
    (["generate", "--keep-ratio", "nan"], "keep_ratio=nan is outside (0, 1]"),
    (["generate", "--cell", "17"], "cell=17 is not allowed: must be an integer in [1, 16]"),
    (["generate", "--cell", "1", "--fill", "distinct"], "fill='distinct' picks tokens unlike the patch winners"),
    (["generate", "--height", "100000", "--width", "100000"],
     "sampling 1 image of 100000x100000 px needs at least 346.9 PiB of memory, more than the"),
    (["generate", "--height", "72"], "image size 72x72 px is not a positive multiple of 16"),
    (["build", "--height", "100000"], "exporting at 100000x100000 px, batch 2 needs at least"),
    (["build", "--model", "tiny-shapes", "--height", "60"], "image size 60x60 px is not a positive multiple of 16"),
    (["flops", "--model", "tiny", "--keep-ratio", "2"], "keep_ratio=2.0 is outside (0, 1]"),
])
def test_bad_values_are_refused_before_a_model_loads(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("atedm_compile.models.load_pipeline", lambda *_, **__: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    assert main(argv + ([] if argv[0] == "flops" else ["--out", str(out)])) == 2
    _one_line(capsys.readouterr().err, message)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["build", "--out", "{out}"], ["run", "{out}", "--out", "{out}/image.png"],
                                  ["check", "{out}"]])
def test_missing_onnx_extra_names_the_extra(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails, as when not installed
    monkeypatch.setitem(sys.modules, "onnx", None)
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    _one_line(capsys.readouterr().err, 'not installed here: pip install "atedm-compile[onnx]"')
    assert not out.exists()


def test_latents_that_are_not_finite_write_no_image(capsys, tmp_path, monkeypatch):
    # generate --guidance 1e308 wrote an all-black PNG and exited 0: NaN latents, decoded.
    from atedm_compile import models

    load = models.load_pipeline

    def overflowing(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.unet.register_forward_hook(lambda module, inputs, output: (output[0] * float("inf"), *output[1:]))
        return pipe

    monkeypatch.setattr(models, "load_pipeline", overflowing)
    out = tmp_path / "out"
    assert main(["generate", "--steps", "2", "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, "sampling step 1 made latents that are not finite (inf or NaN): no image written")
    assert not out.exists()


def _damaged_model(folder: Path, damage: str) -> Path:
    """A copy of the shipped tiny-shapes folder (or a diffusers pipeline folder) with one fault."""
    import json
    import shutil

    from atedm_compile.models import TINY_SHAPES

    model = folder / damage
    if damage in ("no pipeline class", "broken vae config"):
        (model / "unet").mkdir(parents=True)
        (model / "vae").mkdir()
        index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        if damage == "no pipeline class":
            index["_class_name"] = "NoSuchPipeline"
        (model / "model_index.json").write_text(json.dumps(index))
        (model / "unet" / "config.json").write_text(json.dumps({"sample_size": 8, "block_out_channels": [4, 8],
                                                                "down_block_types": ["DownBlock2D"] * 2}))
        (model / "vae" / "config.json").write_text("{broken" if damage == "broken vae config" else
                                                   json.dumps({"block_out_channels": [4, 8]}))
        return model
    shutil.copytree(TINY_SHAPES, model)
    config = json.loads((model / "config.json").read_text())
    if damage == "no sample_size":
        del config["unet"]["sample_size"]
    elif damage == "no block_out_channels":
        del config["vae"]["block_out_channels"]
    elif damage == "other widths":
        config["unet"]["block_out_channels"] = [32, 64, 128]
    elif damage == "truncated weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (model / "config.json").write_text("{\"unet\": " if damage == "broken config" else json.dumps(config))
    return model


@pytest.mark.parametrize("damage, message", [
    ("no sample_size", "no sample_size/config.json: the unet config has no sample_size (the model's own image size)"),
    ("no block_out_channels", "no block_out_channels/config.json: the vae config has no block_out_channels (a list)"),
    ("truncated weights", "truncated weights/model.safetensors is not a whole safetensors file"),
    ("other widths", "other widths/model.safetensors: the unet weights do not fit the config: tensors 719 of other "
                     "shapes (first conv_in.weight: [24, 4, 3, 3] in the weights, [32, 4, 3, 3] by the config)"),
    ("broken config", "broken config/config.json is not valid JSON"),
    ("no pipeline class", "no pipeline class/model_index.json names the pipeline class 'NoSuchPipeline', which "
                          "diffusers"),
    ("broken vae config", "broken vae config/vae/config.json is not valid JSON"),
])
def test_a_damaged_model_folder_is_one_line_naming_the_file(damage, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(_damaged_model(tmp_path, damage)), "--steps", "1", "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, message)
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
@pytest.mark.parametrize("argv, out", [(["generate"], "/proc/atedm-out"), (["generate"], "/sys/atedm/out"),
                                       (["run", "build"], "/proc/atedm-out.png")])
def test_an_output_where_no_file_can_be_made_is_refused_before_sampling(argv, out, capsys, monkeypatch):
    # root passes os.access there: the output was found unwritable only after sampling.
    monkeypatch.setattr("atedm_compile.models.load_pipeline", lambda *_, **__: pytest.fail("a model was loaded"))
    assert main(argv + ["--out", out]) == 2
    _one_line(capsys.readouterr().err, f"--out {out}: /{out.split('/')[1]} takes no new files")


def test_an_output_name_that_is_not_utf8_is_refused_before_anything_is_written(capsys, tmp_path, monkeypatch):
    # The image was written, then printing its name failed: exit 2 with the file on disk.
    monkeypatch.setattr("atedm_compile.models.load_pipeline", lambda *_, **__: pytest.fail("a model was loaded"))
    out = str(tmp_path / "caf\udce9")
    for argv in (["generate", "--out", out], ["run", "build", "--out", out + ".png"],
                 ["evaluate", "--model", "tiny-shapes", "--captions", "c.txt", "--methods", "full",
                  "--reference-stats", __file__, "--out", out]):
        assert main(argv) == 2
        _one_line(capsys.readouterr().err, "caf\\udce9" + ("'" if argv[0] != "run" else ".png'") + " is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("environ, refused", [
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}, True),  # srun -n 4, no torchrun
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "RANK": "1", "WORLD_SIZE": "4"}, False),  # env:// made
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, False),  # srun -n 1
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, False),  # the batch script's own process
    ({}, False),
])
def test_several_slurm_tasks_without_torchrun_are_refused(environ, refused):
    from atedm_compile.evaluate.shards import check_launch

    if refused:
        with pytest.raises(ValueError, match=r"SLURM started 4 tasks of this command \(SLURM_STEP_NUM_TASKS=4\) "
                                             r"without torchrun: no RANK or WORLD_SIZE, so each would do the whole "
                                             r"job into the same --out"):
            check_launch(environ)
    else:
        check_launch(environ)


@pytest.mark.parametrize("argv", [["generate", "--out", "{out}"], ["build", "--out", "{out}"],
                                  ["evaluate", "--model", "tiny-shapes", "--captions", "c.txt", "--methods", "full",
                                   "--reference-stats", __file__, "--out", "{out}"]])
def test_a_plain_srun_of_several_tasks_is_one_line_before_anything_runs(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("atedm_compile.models.load_pipeline", lambda *_, **__: pytest.fail("a model was loaded"))
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    _one_line(capsys.readouterr().err, "SLURM started 2 tasks of this command (SLURM_STEP_NUM_TASKS=2) without torchrun")
    assert not out.exists()


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("atedm_compile.models.load_pipeline", interrupted)
    assert main(["generate", "--model", "tiny", "--out", str(tmp_path / "out")]) == 130
    _one_line(capsys.readouterr().err, "atedm-compile generate: interrupted")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (dict(iterations=10**9), "iterations=1000000000 is not allowed: must be an integer in [1, 100]"),
    (dict(iterations=True), "iterations=True is not allowed"),
    (dict(eta=float("nan")), "eta=nan is not allowed: must be a number in [0.0, 1.0]"),
    (dict(alpha=0.0), "alpha=0.0 is not allowed: must be a number in (0.0, 1000000.0]"),
    (dict(seed="x"), "seed='x' is not allowed: must be an integer"),
    (dict(recovery="zeros", neighbours=64), "neighbours=64 averages the updates of several kept tokens: only "
                                            "recovery='delta' or recovery='merge-delta' has them "
                                            "(recovery='zeros' would ignore it)"),
    (dict(recovery="layer-delta", neighbours=2), "recovery='layer-delta' would ignore it"),
])
def test_pruning_config_names_the_bad_value(options, message):
    with pytest.raises(ValueError) as error:
        PruningConfig(**options)
    assert message in str(error.value)


@pytest.mark.parametrize("options, message", [
    (dict(pruning="gwpr"), "pruning='gwpr' is not a PruningConfig"),
    (dict(opset=5), "opset=5 is not allowed: must be an integer in [14, 20]"),
    (dict(height=0), "height=0 is not allowed"),
    (dict(model=3), "model=3 must be a model name or a directory"),
])
def test_build_config_names_the_bad_value(options, message):
    from atedm_compile.export import BuildConfig

    with pytest.raises(ValueError) as error:
        BuildConfig(**options)
    assert message in str(error.value)


# -- through the CLI, as a user runs it ----------------------------------------------------------


def _start(argv: list, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "atedm_compile.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})


def _bad_manifest(directory: Path) -> Path:
    """A build directory whose manifest has a string where the batch (an integer) goes."""
    import json

    from atedm_compile.export.manifest import FORMAT, FORMAT_VERSION, seal

    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {"name": "tiny", "config": {},
                                                                          "config_sha256": ""},
            "schedule": {"preset": "atedm", "num_steps": 4, "options": {}}, "pruning": {}, "batch": "two"}
    data["seal"] = seal(data)
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps(data))
    return directory


@pytest.fixture(scope="module")
def cli_faults(tmp_path_factory):
    """Each case run as a subprocess, all started together: (result, message, output folder)."""
    root = tmp_path_factory.mktemp("faults")
    hidden = root / "hidden"  # an `onnx` package that fails to import, first on the path
    (hidden / "onnx").mkdir(parents=True)
    (hidden / "onnx" / "__init__.py").write_text("raise ImportError('No module named onnx')\n")
    cases = {
        "zero height": (["generate", "--height", "0"], {}, "argument --height: '0' is not an integer >= 1"),
        "absurd guidance": (["generate", "--guidance", "1e308"], {}, "'1e308' is outside the guidance scales taken"),
        "non-UTF-8 prompt": ([b"generate", b"--prompt", b"\xff\xfe red"], {}, "is not valid UTF-8 text"),
        "image too large": (["generate", "--model", "tiny", "--height", "100000", "--width", "100000"], {},
                            "needs at least 21.7 PiB of memory, more than the"),
        "no TensorRT": (["build", "--backend", "tensorrt"], {}, 'pip install "atedm-compile[tensorrt]"'),
        "no onnx extra": (["build"], {"PYTHONPATH": str(hidden)}, 'pip install "atedm-compile[onnx]"'),
        "mistyped manifest": (["check", str(_bad_manifest(root / "bad-build"))], {},
                              'batch is "two", expected an integer'),
    }
    # A file-size limit of 1 KiB (as a full disk): the image cannot be written, its folder not kept.
    limited = ["import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY)); "
               "from atedm_compile.cli import main; sys.exit(main(sys.argv[1:]))"]
    cases["file-size limit"] = (["generate", "--steps", "1"], {"LIMIT": "1"}, "File too large: '")
    started = {}
    for name, (argv, env, message) in cases.items():
        out = root / name.replace(" ", "-")
        extra = [] if argv[0] == "check" else [b"--out" if isinstance(argv[0], bytes) else "--out", str(out)]
        if env.pop("LIMIT", None):
            process = subprocess.Popen([sys.executable, "-c", *limited, *argv, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
            message += f"{out / 'image.png'}'"
        else:
            process = _start(argv + extra, **env)
        started[name] = (process, message, out)
    results = {}
    for name, (process, message, out) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr.decode(errors="replace"), message, out)
    return results


@pytest.mark.parametrize("case", ["zero height", "absurd guidance", "file-size limit", "non-UTF-8 prompt",
                                  "image too large", "no TensorRT", "no onnx extra", "mistyped manifest"])
def test_bad_input_through_the_cli(cli_faults, case):
    returncode, err, message, out = cli_faults[case]
    assert returncode == 2, err
    _one_line(err, message)
    assert not out.exists()


def test_a_torchvision_built_for_another_torch_fails_only_what_needs_it(tmp_path):
    # pip put a CUDA torchvision beside the CPU torch: importing it raises a RuntimeError, and
    # transformers imports it wherever it finds it: generate, evaluate and the toy metrics crashed.
    hidden = tmp_path / "hidden"
    (hidden / "torchvision").mkdir(parents=True)
    (hidden / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    (hidden / "torchvision-0.28.0.dist-info").mkdir()
    (hidden / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Name: torchvision\nVersion: 0.28.0\n")
    captions, reference = tmp_path / "captions.txt", tmp_path / "reference"
    captions.write_text("a red square\na blue circle\n")
    reference.mkdir()
    evaluate = ["evaluate", "--model", "tiny-shapes", "--captions", str(captions), "--reference", str(reference),
                "--methods", "full", "--steps", "1", "--out", str(tmp_path / "eval")]
    generate, metrics = (_start(argv, PYTHONPATH=str(hidden)) for argv in (
        ["generate", "--steps", "1", "--out", str(tmp_path / "out")], evaluate))
    results = [process.communicate(timeout=300) for process in (generate, metrics)]
    assert generate.returncode == 0, results[0][1].decode()[-3000:]
    assert (tmp_path / "out" / "image.png").is_file()
    assert metrics.returncode == 2
    _one_line(results[1][1].decode(), "the paper's metrics need a torchvision built for this torch: torchvision "
                                      "0.28.0 does not import with torch")
    assert "operator torchvision::nms does not exist" in results[1][1].decode()
    assert not (tmp_path / "eval").exists()


def test_ctrl_c_through_the_cli(tmp_path):
    out = tmp_path / "out"
    process = _start(["generate", "--model", "tiny", "--steps", "50", "--out", str(out)])
    seen, deadline = b"", time.monotonic() + 120
    while b"sampling" not in seen and time.monotonic() < deadline:  # the progress bar: sampling has begun
        ready, _, _ = select.select([process.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    assert b"sampling" in seen, seen
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    err = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, err
    assert err.rstrip().splitlines()[-1].endswith("atedm-compile generate: interrupted")
    assert "Traceback" not in err
    assert not out.exists()


def test_two_builds_into_one_folder_end_as_one_valid_build(tmp_path):
    out = tmp_path / "build"
    argv = ["build", "--model", "tiny", "--schedule", "uniform", "--steps", "1", "--out", str(out)]
    first, second = _start(argv), _start(argv)
    results = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == second.returncode == 0, [r[1].decode()[-2000:] for r in results]
    logs = b"".join(out + err for out, err in results).decode()
    assert "locked by another build: waiting" in logs and "1 of 6 build stages ran" in logs  # the second found it done
    from atedm_compile.export import check, read_manifest
    from atedm_compile.models import build_unet

    assert check(out, log=lambda _: None).ok
    # One copy of the weights: every byte of weights.bin is an indexed tensor, and they are the U-Net's.
    index = read_manifest(out).weights_index.values()
    size = (out / "weights.bin").stat().st_size
    assert size == max(entry["offset"] + entry["length"] for entry in index)
    assert size <= 1.05 * sum(p.numel() * 4 for p in build_unet("tiny").parameters())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (
        ".atedm-export", ".atedm-export.lock")) == []


def test_check_and_run_on_a_file_say_it_is_no_build_directory(tmp_path, capsys):
    file = tmp_path / "afile"
    file.write_text("not a build")
    for argv in (["check", str(file)], ["run", str(file), "--out", str(tmp_path / "image.png")]):
        assert main(argv) == 2
        _one_line(capsys.readouterr().err, "afile is a file, not a build directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("content, message", [
    (b"[]", "manifest.json holds [], not an atedm-compile export manifest (a JSON object)"),
    (b"null", "manifest.json holds null, not an atedm-compile export manifest (a JSON object)"),
    (b'{"format": "caf\xe9"}', "manifest.json is not UTF-8 text (byte 15): not an atedm-compile export manifest"),
])
def test_a_manifest_that_is_no_json_object_is_named(content, message, capsys, tmp_path):
    from atedm_compile.export import ManifestError, read_manifest

    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_bytes(content)
    for argv in (["check", str(build)], ["run", str(build), "--out", str(tmp_path / "image.png")]):
        assert main(argv) == 2
        _one_line(capsys.readouterr().err, message)
    with pytest.raises(ManifestError, match=re.escape(message)):  # what `build` into the folder catches, to build anew
        read_manifest(build)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["build", "manifest.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_memory_of_a_gpu_this_machine_lacks_is_an_error_naming_it():
    # `run --backend tensorrt` checks the GPU's memory first: without CUDA, a message, not an assertion.
    from atedm_compile.memory import memory_limit

    with pytest.raises(ValueError, match="device 'cuda' is not available here: torch .* sees no CUDA GPU"):
        memory_limit("cuda")
