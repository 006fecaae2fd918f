import socket

import pytest
import torch

from atedm_compile.models import TRAINED_MODELS, load_pipeline, load_trained_pipeline, model_folder, read_config
from atedm_compile.runner import apply, remove
from atedm_compile.shapes import synthetic
from atedm_compile.tracing import attention_blocks

PROMPT = "a large red square in the center on a plain white background"


@pytest.fixture(scope="module", params=TRAINED_MODELS)
def trained(request):
    """(name, pipeline, image size) of each shipped model."""
    name = request.param
    return name, load_pipeline(name), read_config(model_folder(name))["image_size"]


def _generate(pipe, size, prompt=PROMPT, seed=0, steps=12):
    return pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_loads_offline(monkeypatch, name):
    def refuse(*args, **kwargs):
        raise OSError("the trained model must load without the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    pipe = load_trained_pipeline(model_folder(name))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("name,limit_mb", [("tiny-shapes", 20), ("tiny-shapes-xl", 25)])
def test_ships_small_safetensors_weights(name, limit_mb):
    folder = model_folder(name)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= limit_mb * 2**20


def test_has_the_sdxl_topology(trained):
    name, pipe, _ = trained
    config = pipe.unet.config
    assert list(config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert config.addition_embed_type == "text_time"
    blocks = attention_blocks(pipe.unet)
    assert blocks and all(len(pipe.unet.get_submodule(b.path).transformer_blocks) >= 2 for b in blocks)


def test_xl_has_the_sdxl_depth_pattern():
    """tiny-shapes-xl: 2-layer blocks at level 2 (at least 256 tokens), 10-layer blocks at level 3
    and in the mid block, as SD-XL's A2 and A10 blocks."""
    config = read_config(model_folder("tiny-shapes-xl"))
    unet, size = config["unet"], config["image_size"]
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    latent = size // 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    assert latent >= 32 and (latent // 2) ** 2 >= 256


def test_generates_the_captioned_colour(trained):
    _, pipe, size = trained
    image = _generate(pipe, size)
    assert image.size == (size, size)
    found = synthetic.detect(image)
    assert found is not None and found.colour == "red"


def test_prunes_under_the_runner(trained):
    _, pipe, size = trained
    runner = apply(pipe, "atedm", keep_ratio=0.37)
    try:
        with runner.capture_kept_tokens() as kept:
            image = _generate(pipe, size, steps=4)
    finally:
        remove(pipe)
    assert image.size == (size, size)
    tokens = (size // pipe.vae_scale_factor // 2) ** 2  # level 2: one halving below the latent
    assert kept["down1.F"].shape == (2, round(0.37 * tokens))


def test_readme_main_job_keeps_the_captions_colour_and_shape(tmp_path):
    """`atedm-compile generate` with its defaults (tiny-shapes, the default prompt, seed 0, 50
    steps, the atedm schedule, DEFAULT_PRUNING): the object has the caption's colour and shape,
    as the full model's does from the same noise (issue 8; the paper's copy turned it green)."""
    from PIL import Image

    from atedm_compile.cli import main

    found = {}
    for schedule in ("atedm", "none"):
        assert main(["generate", "--schedule", schedule, "--out", str(tmp_path / schedule)]) == 0
        image = Image.open(tmp_path / schedule / "image.png")
        found[schedule] = synthetic.score(image, "a small red triangle at the top left on a striped blue background")
    for schedule, score in found.items():
        assert score["colour"] and score["shape"], (schedule, score)
