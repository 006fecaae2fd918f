"""The shipped trained model: a small SD-XL-topology pipeline trained on ``synthetic`` shapes.

The package holds one folder per model under ``weights/``: ``config.json`` (the configs of the
U-Net, VAE, both text encoders and the scheduler, and how it was trained) and ``model.safetensors``
(every weight, fp16, keys prefixed by component). Loading reads those two files only: no pickle,
no network. ``benchmarks/train_tiny_model.py`` writes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"
TINY_SHAPES = WEIGHTS / "tiny-shapes"
TINY_SHAPES_XL = WEIGHTS / "tiny-shapes-xl"
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def model_folder(model: str | Path) -> Path | None:
    """The folder of a trained model: ``weights/<name>`` for a shipped model's name
    (``models.TRAINED_MODELS``), the path itself for a folder laid out like one (``config.json``
    with the component configs, ``model.safetensors``); None for anything else."""
    from .models import TRAINED_MODELS

    if str(model) in TRAINED_MODELS:
        return WEIGHTS / str(model)
    folder = Path(model)
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    try:
        config = read_config(folder)
    except (OSError, ValueError):
        return None
    return folder if isinstance(config, dict) and {"unet", "vae"} <= config.keys() else None


def build_pipeline(config: dict, weights: dict[str, torch.Tensor] | None = None):
    """A ``StableDiffusionXLPipeline`` from a model folder's config, with ``weights`` (the
    prefixed state dict of ``model.safetensors``) loaded, or randomly initialised without."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import build_unet, tiny_tokenizer

    tokenizer = tiny_tokenizer(config.get("tokenizer_words", ()))
    parts = {
        "unet": build_unet(config["unet"]),
        "vae": AutoencoderKL.from_config(config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
    }
    if weights is not None:
        for name, module in parts.items():
            prefix = name + "."
            state = {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(config["scheduler"]),
        add_watermarker=False,
        **{name: module.eval().requires_grad_(False) for name, module in parts.items()},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state_dict(pipe, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's components, keys prefixed by component, as ``dtype``."""
    return {f"{name}.{k}": v.detach().to(dtype).contiguous()
            for name in COMPONENTS for k, v in getattr(pipe, name).state_dict().items()}


def write_atomically(path: Path, write) -> None:
    """Write ``path`` by ``write(tmp)`` on a temporary file beside it, then rename: readers see the
    old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(directory: str | Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "model.safetensors", lambda tmp: save_file(weights, tmp))
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    write_atomically(directory / "config.json", lambda tmp: Path(tmp).write_text(text))


def read_config(directory: str | Path = TINY_SHAPES) -> dict:
    """The component configs of a shipped model (``config.json``)."""
    return json.loads((Path(directory) / "config.json").read_text())


def vae_factor(config: dict) -> int:
    """Pixels per latent cell, per side, of a model folder's config: one halving per VAE level but the last."""
    return 2 ** (len(config["vae"]["block_out_channels"]) - 1)


def load_unet(directory: str | Path = TINY_SHAPES):
    """The U-Net of a trained model folder alone (float32), without its VAE and text encoders."""
    from safetensors import safe_open

    from .models import build_unet

    directory = Path(directory)
    unet = build_unet(read_config(directory)["unet"])
    with safe_open(str(directory / "model.safetensors"), framework="pt") as weights:
        state = {k[len("unet."):]: weights.get_tensor(k).float() for k in weights.keys() if k.startswith("unet.")}
    unet.load_state_dict(state, strict=True)
    return unet


def load_trained_pipeline(directory: str | Path = TINY_SHAPES, device: str | torch.device = "cpu"):
    """The trained pipeline shipped in the package (or the one in ``directory``), in float32.

    Trained on 64 x 64 px images (latent 16 x 16): sample at ``height=width=64``.

    Example:
        >>> import torch
        >>> from atedm_compile.trained import load_trained_pipeline
        >>> pipe = load_trained_pipeline()
        >>> image = pipe("a large red circle in the center on a plain white background", height=64,
        ...              width=64, num_inference_steps=20, guidance_scale=4.0,
        ...              generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.size
        (64, 64)
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    pipe = build_pipeline(read_config(directory), load_file(directory / "model.safetensors"))
    return pipe.to(device)
