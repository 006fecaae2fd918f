"""Writing a trained model folder (``config.json`` + ``model.safetensors``, the layout that
``models.TRAINED_MODELS`` names and ``models.load_trained_pipeline`` reads), for
``benchmarks/train_tiny_model.py``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import write_atomically

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def state_dict(pipe, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's components, keys prefixed by component, as ``dtype``."""
    return {f"{name}.{k}": v.detach().to(dtype).contiguous()
            for name in COMPONENTS for k, v in getattr(pipe, name).state_dict().items()}


def save_model(directory: str | Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / "model.safetensors", lambda tmp: save_file(weights, tmp))
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    write_atomically(directory / "config.json", lambda tmp: Path(tmp).write_text(text))


