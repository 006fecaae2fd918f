"""Trained model folders: the shipped ones (``TRAINED_MODELS``, under ``weights/``) and any
folder laid out like them: ``config.json`` (the configs of the U-Net, VAE, both text encoders and
the scheduler) and ``model.safetensors`` (every weight, keys prefixed by component). Loading reads
those two files only: no pickle, no network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .configs import TINY_SHAPES, TRAINED_MODELS, WEIGHTS, own_height
from .tiny import tiny_tokenizer
from .unets import unet_from_config


def model_folder(model: str | Path) -> Path | None:
    """The folder of a trained model: ``weights/<name>`` for a shipped model's name
    (``TRAINED_MODELS``), the path itself for a folder laid out like one (``config.json``
    with the component configs, ``model.safetensors``); None for anything else. ValueError naming
    the file where such a folder's ``config.json`` is broken."""
    if str(model) in TRAINED_MODELS:
        return WEIGHTS / str(model)
    folder = Path(model)
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    config = read_config(folder)
    if not {"unet", "vae"} <= config.keys():
        return None  # another library's model (transformers lays its models out alike)
    path = folder / "config.json"
    for part in ("unet", "vae"):
        if not isinstance(config[part], dict):
            raise ValueError(f"{path}: {part} is {type(config[part]).__name__}, not the object of its config")
    _check_configs(config["unet"], config["vae"], path, path)
    own_height(config["unet"], 1, path)  # a trained model's folder says its size
    return folder


def _check_configs(unet: dict, vae: dict, unet_path: Path, vae_path: Path) -> None:
    """ValueError naming the file where the U-Net or VAE config lacks what sampling reads first."""
    for part, config, path, needed in (("unet", unet, unet_path, ("down_block_types", "block_out_channels")),
                                       ("vae", vae, vae_path, ("block_out_channels",))):
        missing = [key for key in needed if not isinstance(config.get(key), list) or not config[key]]
        if missing:
            raise ValueError(f"{path}: the {part} config has no {', '.join(missing)} (a list)")


def read_config(directory: str | Path = TINY_SHAPES) -> dict:
    """The component configs of a shipped model (``config.json``); ValueError naming the file
    where it is no JSON object."""
    return read_json_object(Path(directory) / "config.json")


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file where it holds anything else."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: byte {error.start} is {error.object[error.start]:#04x}") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {json.dumps(data)[:40]}, not a JSON object")
    return data




def build_pipeline(config: dict, weights: dict[str, torch.Tensor] | None = None, source: str | Path | None = None):
    """A ``StableDiffusionXLPipeline`` from a model folder's config, with ``weights`` (the
    prefixed state dict of ``model.safetensors``, ``source`` in errors) loaded, or randomly
    initialised without."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(config.get("tokenizer_words", ()))
    parts = {
        "unet": unet_from_config(config["unet"]),
        "vae": AutoencoderKL.from_config(config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
    }
    if weights is not None:
        for name, module in parts.items():
            prefix = name + "."
            load_weights(module, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                         f"{source}: the {name}" if source else f"the {name}")
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(config["scheduler"]),
        add_watermarker=False,
        **{name: module.eval().requires_grad_(False) for name, module in parts.items()},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(directory: str | Path = TINY_SHAPES):
    """The U-Net of a trained model folder alone (float32), without its VAE and text encoders."""
    directory = Path(directory)
    unet = unet_from_config(read_config(directory)["unet"])
    state = _read_weights(directory, "unet.")
    load_weights(unet, {k[len("unet."):]: v for k, v in state.items()}, f"{directory / 'model.safetensors'}: the unet")
    return unet


def _read_weights(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a model folder's ``model.safetensors`` whose names start with ``prefix``."""
    from safetensors import SafetensorError, safe_open

    path = directory / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: weights.get_tensor(name) for name in weights.keys() if name.startswith(prefix)}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a whole safetensors file: {error}") from None


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` (as float32), or one ValueError saying how ``what`` (the
    weights) and the module built from the config differ."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        said = [f"{len(shapes)} of other shapes (first {shapes[0]}: {list(state[shapes[0]].shape)} in the weights, "
                f"{list(own[shapes[0]].shape)} by the config)"] if shapes else []
        said += [f"{len(missing)} missing (first {missing[0]})"] if missing else []
        said += [f"{len(unexpected)} not in the config (first {unexpected[0]})"] if unexpected else []
        raise ValueError(f"{what} weights do not fit the config: tensors {'; '.join(said)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_trained_pipeline(directory: str | Path = TINY_SHAPES, device: str | torch.device = "cpu"):
    """The trained pipeline shipped in the package (or the one in ``directory``), in float32.

    Trained on 64 x 64 px images (latent 16 x 16): sample at ``height=width=64``.

    Example:
        >>> import torch
        >>> from atedm_compile.models import load_trained_pipeline
        >>> pipe = load_trained_pipeline()
        >>> image = pipe("a large red circle in the center on a plain white background", height=64,
        ...              width=64, num_inference_steps=20, guidance_scale=4.0,
        ...              generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.size
        (64, 64)
    """
    directory = Path(directory)
    pipe = build_pipeline(read_config(directory), _read_weights(directory), directory / "model.safetensors")
    return pipe.to(device)


