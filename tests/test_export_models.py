"""Builds of every model ``generate`` takes (the shipped trained model, by name or folder), and fp16
builds, run on the CPU."""

import numpy as np
import pytest
import torch
from export_build import pytorch_latent
from PIL import Image

import atedm_compile as ac
from atedm_compile.cli import main
from atedm_compile.export import BuildConfig, build, load
from atedm_compile.export.build import model_identity
from atedm_compile.export.onnx import example_inputs
from atedm_compile.models import load_pipeline
from atedm_compile.models import TINY_SHAPES, load_unet

STEPS = 4


@pytest.fixture(scope="module")
def shapes_build(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "tiny-shapes"
    assert main(["build", "--model", "tiny-shapes", "--steps", str(STEPS), "--out", str(directory)]) == 0
    return directory


def test_the_shipped_model_builds_by_name_or_folder():
    by_name, config, factor = model_identity("tiny-shapes", 0)
    by_folder, folder_config, folder_factor = model_identity(str(TINY_SHAPES), 0)
    assert (config, factor) == (folder_config, folder_factor) and factor == 4
    assert by_name["files"] == by_folder["files"] and set(by_name["files"]) == {"config.json", "model.safetensors"}
    assert by_folder["name"] == str(TINY_SHAPES.resolve())


def test_run_on_the_shipped_model_gives_generates_image(shapes_build, tmp_path, capsys):
    manifest = ac.export.read_manifest(shapes_build)
    assert (manifest.height, manifest.width, manifest.latent) == (64, 64, (16, 16))
    assert main(["generate", "--steps", str(STEPS), "--out", str(tmp_path / "generate")]) == 0
    assert main(["run", str(shapes_build), "--out", str(tmp_path / "run.png")]) == 0
    generated = np.asarray(Image.open(tmp_path / "generate" / "image.png"), dtype=np.int16)
    ran = np.asarray(Image.open(tmp_path / "run.png"), dtype=np.int16)
    assert generated.shape == ran.shape == (64, 64, 3)
    assert np.abs(generated - ran).max() <= 1  # fp32 ONNX Runtime vs PyTorch: at most a rounding step


def test_the_shipped_models_build_matches_the_pytorch_runner(shapes_build):
    pipe = load_pipeline("tiny-shapes")
    kwargs = dict(prompt="a large red circle in the center on a plain white background", height=64, width=64,
                  num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")
    ac.apply(pipe, "atedm")
    reference = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    ac.remove(pipe)
    unet = load(shapes_build).attach(pipe)
    image = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert [c.phase for c in unet.calls] == ["prune-less", "pruned", "pruned", "pruned"]
    assert np.abs(image - reference).max() <= 1e-4


@pytest.mark.slow
def test_an_fp16_build_runs_on_the_cpu_close_to_fp32(tmp_path):
    # The trained model: its token scores are far enough apart that fp16 picks the same tokens (the
    # random-weight tiny model's near-ties flip under fp16 rounding, which says nothing of the export).
    # The paper's recovery: its phases differ far more than the delta default's, so a phase mix-up shows.
    pruning = ac.PruningConfig()
    manifest, _ = build(BuildConfig(model="tiny-shapes", num_steps=2, precision="fp16", pruning=pruning),
                        tmp_path / "fp16", log=lambda _: None)
    unet = load(tmp_path / "fp16")  # optimised for the CPU, weights pooled across phases
    reference = load_unet(TINY_SHAPES)
    runner = ac.apply(reference, "atedm", pruning)
    runner.start(2)
    feed = example_inputs(manifest.phases[0].inputs, seed=2)
    outputs = {}
    try:
        for phase in manifest.phases:
            runner.use_phase(phase.name)
            expected = pytorch_latent(reference, feed)
            outputs[phase.name] = unet.engines[phase.name].infer(feed)["latent"]
            error = (outputs[phase.name].float() - expected).abs()
            assert outputs[phase.name].dtype == torch.float16
            assert error.max().item() <= 3e-2 * expected.abs().max().item()
            assert error.mean().item() <= 3e-3 * expected.abs().mean().item()
    finally:
        ac.remove(reference)
    difference = (outputs["prune-less"].float() - outputs["pruned"].float()).abs().mean().item()
    assert difference > 10 * 3e-3 * expected.abs().mean().item()  # the phases differ far more than fp16 errs
