import socket

import pytest
import torch

from atedm_compile.shapes import synthetic
from atedm_compile.runner import apply, remove
from atedm_compile.tracing import attention_blocks
from atedm_compile.models import TINY_SHAPES, load_trained_pipeline

PROMPT = "a large red square in the center on a plain white background"


@pytest.fixture(scope="module")
def trained_pipe():
    return load_trained_pipeline()


def _generate(pipe, prompt=PROMPT, seed=0, steps=12):
    return pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(seed)).images[0]


def test_loads_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the trained model must load without the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    pipe = load_trained_pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_ships_small_safetensors_weights():
    files = sorted(p.name for p in TINY_SHAPES.iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in TINY_SHAPES.iterdir()) <= 20 * 2**20


def test_has_the_sdxl_topology(trained_pipe):
    config = trained_pipe.unet.config
    assert list(config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert config.addition_embed_type == "text_time"
    blocks = attention_blocks(trained_pipe.unet)
    assert blocks and all(len(trained_pipe.unet.get_submodule(b.path).transformer_blocks) >= 2 for b in blocks)


def test_generates_the_captioned_colour(trained_pipe):
    found = synthetic.detect(_generate(trained_pipe))
    assert found is not None and found.colour == "red"


def test_prunes_under_the_runner(trained_pipe):
    runner = apply(trained_pipe, "atedm", keep_ratio=0.37)
    try:
        with runner.capture_kept_tokens() as kept:
            image = _generate(trained_pipe, steps=4)
    finally:
        remove(trained_pipe)
    assert image.size == (64, 64)
    assert kept["down1.F"].shape == (2, round(0.37 * 64))
