"""The registry of named models: the U-Net configs (``UNET_CONFIGS``; those that are whole
pipelines: ``tiny.PIPELINES``), the trained models shipped in ``weights/`` (``TRAINED_MODELS``), and
what a config says about the inputs and image sizes it takes.

No weights can be downloaded where this project is developed and tested, so every built-in model
is a config: the real SD-XL / SD 1.5 / SD 2.1 U-Net configs (for FLOPs on the meta device) and
tiny SD-XL-topology models with random weights (for tests and the embedded default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SDXL_BASE_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# SDXL-Turbo ships the SD-XL base U-Net unchanged; it samples at 512 px (latent 64).
SDXL_TURBO_UNET = {**SDXL_BASE_UNET, "sample_size": 64}

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "sample_size": 96,
    "use_linear_projection": True,
}

# SD-XL topology (no attention at level 1, multi-layer blocks at levels 2 and 3) at toy width.
TINY_SDXL_UNET = {
    **SDXL_BASE_UNET,
    "attention_head_dim": [2, 2, 4],
    "block_out_channels": [32, 64, 128],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 2, 2],
}

TINY_SD15_UNET = {
    **SD15_UNET,
    "attention_head_dim": 2,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "transformer_layers_per_block": 2,
}

UNET_CONFIGS = {
    "sdxl-base": SDXL_BASE_UNET,
    "sdxl-turbo": SDXL_TURBO_UNET,
    "sd15": SD15_UNET,
    "sd21": SD21_UNET,
    "tiny": TINY_SDXL_UNET,
    "tiny-sd15": TINY_SD15_UNET,
}

TINY_VAE = {
    "block_out_channels": [16, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
}




@dataclass(frozen=True)
class BuiltPipeline:
    """How a built-in config becomes a whole pipeline: ``build(seed)`` returns it with random
    weights (float32, CPU), and ``vae`` is its VAE's config (read without building anything)."""

    build: Callable[[int], object]
    vae: dict


# The trained pipelines shipped in the package, by name: one folder each under weights/, holding
# config.json (the configs of the U-Net, VAE, both text encoders and the scheduler, and how it was
# trained) and model.safetensors (every weight, fp16, keys prefixed by component). Loading reads
# those two files only: no pickle, no network. benchmarks/train_tiny_model.py writes them.
TRAINED_MODELS = ("tiny-shapes", "tiny-shapes-xl")
WEIGHTS = Path(__file__).parent.parent / "weights"
TINY_SHAPES = WEIGHTS / "tiny-shapes"
TINY_SHAPES_XL = WEIGHTS / "tiny-shapes-xl"

TEXT_LENGTH = 77  # tokens of the CLIP text encoders
TIME_IDS = 6  # SD-XL's added time ids: original size, crop corner, target size


def unet_input_shapes(unet_config, batch: int, latent_height: int, latent_width: int) -> dict[str, tuple]:
    """Shapes of a U-Net call's inputs (timestep: one scalar for the batch), with SD-XL's added
    ``text_embeds`` (the pooled text: what the added projection takes besides the time ids) and
    ``time_ids`` where the config has them.

    Example:
        >>> unet_input_shapes(UNET_CONFIGS["sdxl-base"], 2, 128, 128)["text_embeds"]
        (2, 1280)
    """
    shapes = {
        "sample": (batch, unet_config["in_channels"], latent_height, latent_width),
        "timestep": (),
        "encoder_hidden_states": (batch, TEXT_LENGTH, unet_config["cross_attention_dim"]),
    }
    if unet_config.get("addition_embed_type") == "text_time":
        time_width = TIME_IDS * unet_config["addition_time_embed_dim"]
        text_width = unet_config["projection_class_embeddings_input_dim"] - time_width
        shapes["text_embeds"] = (batch, text_width)
        shapes["time_ids"] = (batch, TIME_IDS)
    return shapes


def own_height(unet_config, vae_factor: int, path: Path | None = None) -> int:
    """The image height a model is made for (``sample_size`` latent cells); ValueError (naming
    the config's ``path`` where given) where its config does not say."""
    size = unet_config.get("sample_size") if isinstance(unet_config, dict) else getattr(unet_config, "sample_size", None)
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        where = f"{path}: the unet config" if path else "the U-Net config"
        said = "has no sample_size" if size is None else f"has sample_size {size!r}, not a positive integer"
        raise ValueError(f"{where} {said} (the model's own image size){'' if path else ': give --height'}")
    return size * vae_factor


def check_image_size(height: int, width: int, unet_config, vae_factor: int) -> None:
    """ValueError unless ``height`` x ``width`` px suits a U-Net of this config: positive multiples
    of the VAE factor times one halving per U-Net down stage but the last.

    Example:
        >>> check_image_size(1024, 1024, UNET_CONFIGS["sdxl-base"], 8)
        >>> check_image_size(1000, 1024, UNET_CONFIGS["sdxl-base"], 8)
        Traceback (most recent call last):
        ...
        ValueError: image size 1024x1000 px is not a positive multiple of 32 for this model
    """
    multiple = 2 ** (len(unet_config["down_block_types"]) - 1) * vae_factor
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} px is not a positive multiple of {multiple} for this model")


def vae_factor_of(vae_config: dict | None) -> int:
    """Pixels per latent cell, per side, of a VAE of this config: one halving per encoder stage
    but the last (8, the Stable Diffusion VAE's, where the config is not known).

    Example:
        >>> vae_factor_of({"block_out_channels": [32, 64]}), vae_factor_of(None)
        (2, 8)
    """
    return 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8
