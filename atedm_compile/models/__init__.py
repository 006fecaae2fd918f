"""U-Net configs, pipeline builders, and the one registry of named models.

A model name is a U-Net config (``UNET_CONFIGS``: random weights; with a whole pipeline where
``PIPELINES`` has one), a shipped trained model (``TRAINED_MODELS``: a folder under ``weights/``,
loaded by ``load_trained_pipeline``) or a diffusers folder / hub id. ``resolve_model`` decides
which (``source.py``); every other part of the package asks it, never the names or the folders.

No weights can be downloaded where this project is developed and tested, so every model here is
built from a config: the real SD-XL / SD 1.5 / SD 2.1 U-Net configs (for FLOPs on the meta device)
and tiny SD-XL-topology models with random weights (for tests and the embedded default).
``load_pipeline`` keeps the real ``from_pretrained`` path for users who have weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .source import BuiltInModel, BuiltPipeline, DiffusersModel, ModelSource, TrainedModel, resolve_model, vae_factor_of

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


# The trained pipelines shipped in the package, by name: one folder each under weights/, holding
# config.json (the configs of the U-Net, VAE, both text encoders and the scheduler, and how it was
# trained) and model.safetensors (every weight, fp16, keys prefixed by component). Loading reads
# those two files only: no pickle, no network. benchmarks/train_tiny_model.py writes them.
TRAINED_MODELS = ("tiny-shapes", "tiny-shapes-xl")
WEIGHTS = Path(__file__).parent.parent / "weights"
TINY_SHAPES = WEIGHTS / "tiny-shapes"
TINY_SHAPES_XL = WEIGHTS / "tiny-shapes-xl"


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


def folder_vae_factor(config: dict) -> int:
    """Pixels per latent cell, per side, of a model folder's config: one halving per VAE level but the last."""
    return vae_factor_of(config["vae"])


def unet_config(name: str) -> dict:
    """The U-Net config of the model ``name`` (``resolve_model``: a config name, a trained model or
    its folder, a local diffusers folder); ValueError naming what is allowed otherwise."""
    return resolve_model(name).unet_config()


def vae_factor(name: str) -> int:
    """Pixels per latent cell, per side, of the pipeline the model ``name`` belongs to (8 for the
    SD families and a bare U-Net config; the others' VAE configs say)."""
    source = resolve_model(name)
    source.unet_config()  # a clear error for a name that is no model here
    return source.vae_factor


TEXT_LENGTH = 77  # tokens of the CLIP text encoders
TIME_IDS = 6  # SD-XL's added time ids: original size, crop corner, target size


def unet_input_shapes(unet_config, batch: int, latent_height: int, latent_width: int) -> dict[str, tuple]:
    """Shapes of a U-Net call's inputs (timestep: one scalar for the batch), with SD-XL's added
    ``text_embeds`` (the pooled text: what the added projection takes besides the time ids) and
    ``time_ids`` where the config has them.

    Example:
        >>> unet_input_shapes(unet_config("sdxl-base"), 2, 128, 128)["text_embeds"]
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
        >>> check_image_size(1024, 1024, unet_config("sdxl-base"), 8)
        >>> check_image_size(1000, 1024, unet_config("sdxl-base"), 8)
        Traceback (most recent call last):
        ...
        ValueError: image size 1024x1000 px is not a positive multiple of 32 for this model
    """
    multiple = 2 ** (len(unet_config["down_block_types"]) - 1) * vae_factor
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} px is not a positive multiple of {multiple} for this model")


def build_unet(
    name_or_config: str | dict,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``UNet2DConditionModel`` from a named or given config, randomly initialised, in ``dtype``.

    On ``device="meta"`` no memory is allocated: enough for FLOPs counting. On an accelerator the
    model is built on the meta device and its weights are drawn where they live (no host copy:
    SD-XL's are 10 GB in float32); the draw differs from the CPU's for the same seed.
    """
    from diffusers import UNet2DConditionModel

    from ..devices import cast

    if isinstance(name_or_config, str):
        config = unet_config(name_or_config)
    else:
        # A model's saved config lists the keys it left at their defaults (_use_default_values);
        # drop such private keys so that every value given here is honoured.
        config = {k: v for k, v in dict(name_or_config).items() if not k.startswith("_")}
    device = torch.device(device)
    on_host = device.type in ("cpu", "meta")
    torch.manual_seed(seed)
    with torch.device(device if on_host else "meta"):
        unet = UNet2DConditionModel.from_config(config)
    if not on_host:
        initialise_on(unet, device, dtype, seed)
    elif dtype != torch.float32:
        cast(unet, dtype=dtype)
    return unet.eval().requires_grad_(False)


def initialise_on(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Give a model built on the meta device storage on ``device`` in ``dtype`` and draw its
    weights there with each layer's own initialisation (``reset_parameters``)."""
    from ..devices import cast

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    missing = sorted({type(m).__name__ for m in owners if not hasattr(m, "reset_parameters")})
    if missing or any(True for _ in model.buffers()):
        raise NotImplementedError(f"cannot initialise {type(model).__name__} on {device}: "
                                  f"{missing or 'buffers'} have no reset_parameters")
    cast(model, dtype=dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in owners:
            module.reset_parameters()


def tiny_tokenizer(words: Sequence[str] = ()):
    """A real ``CLIPTokenizer`` over a byte-level vocabulary: every byte is a token, with and
    without the end-of-word marker, and each of ``words`` is one token more (BPE merges that
    build it). Any other text still tokenizes, byte by byte. Needs no download.

    Example:
        >>> tokenizer = tiny_tokenizer(["red", "square"])
        >>> tokenizer.tokenize("a red square")
        ['a</w>', 'red</w>', 'square</w>']
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    base = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []

    def build():
        vocab = dict(base)
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)

    # BPE applies its merges by rank, so one word's merges can split another: add merges that
    # join whatever pieces a word still falls into, until every word is one token.
    tokenizer = build()
    for _ in range(len(words) + 1):
        split = [pieces for pieces in map(tokenizer.tokenize, words) if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            joined = pieces[0]
            for piece in pieces[1:]:
                if (joined, piece) not in merges:
                    merges.append((joined, piece))
                joined += piece
        tokenizer = build()
    raise ValueError(f"could not make single tokens of {[w for w in words if len(tokenizer.tokenize(w)) > 1]}")


def _tiny_text_encoders(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    # SD-XL concatenates the penultimate hidden states of both encoders: 32 + 32 = 64
    # = TINY_SDXL_UNET["cross_attention_dim"]; encoder 2's projection feeds text_embeds.
    encoder_1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    return encoder_1.eval(), encoder_2.eval()


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete ``StableDiffusionXLPipeline`` with random weights, built offline in about a second.

    U-Net: ``TINY_SDXL_UNET``; VAE: 4 levels of 16 channels (latent 32 -> 256 px); text: two
    2-layer CLIP encoders behind a byte-level CLIP tokenizer.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder, text_encoder_2 = _tiny_text_encoders(len(tokenizer))
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    unet = build_unet("tiny", seed=seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` (SD 1.x topology: attention at level 1, conv projections)
    with random weights, built offline. Latent 16x16 -> 128 px."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder, _ = _tiny_text_encoders(len(tokenizer))
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet("tiny-sd15", seed=seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The built-in configs that are also whole pipelines (random weights, built offline), by name:
# ``generate``, ``run`` and ``evaluate`` sample with them. ``vae``: the pipeline's VAE config.
PIPELINES = {"tiny": BuiltPipeline(lambda seed: tiny_sdxl_pipeline(seed), TINY_VAE)}


def build_pipeline(config: dict, weights: dict[str, torch.Tensor] | None = None, source: str | Path | None = None):
    """A ``StableDiffusionXLPipeline`` from a model folder's config, with ``weights`` (the
    prefixed state dict of ``model.safetensors``, ``source`` in errors) loaded, or randomly
    initialised without."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
    unet = build_unet(read_config(directory)["unet"])
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


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """The pipeline for ``model`` on ``device`` in ``dtype`` (``resolve_model``): a shipped trained
    model (``TRAINED_MODELS``: ``"tiny-shapes"``, ``"tiny-shapes-xl"``, trained on synthetic shapes)
    or the folder of one, a built-in pipeline (``PIPELINES``: ``"tiny"``, random weights from
    ``seed``) or a local path / hub id loaded with diffusers' ``DiffusionPipeline.from_pretrained``
    (SD-XL and SD 1.x / 2.x pipelines)."""
    return resolve_model(model).load_pipeline(dtype, device, seed)


def _check_model_index(path: Path) -> None:
    """ValueError naming ``path`` where it names a class diffusers or transformers lacks (diffusers
    itself fails with an AttributeError deep in its loader)."""
    import importlib

    index = read_json_object(path)
    classes = [("pipeline", "diffusers", index.get("_class_name"))]
    classes += [(part, *spec) for part, spec in index.items() if not part.startswith("_") and isinstance(spec, list)
                and len(spec) == 2 and spec[0] in ("diffusers", "transformers")]
    for part, library, name in classes:
        module = importlib.import_module(library)
        if not isinstance(name, str) or not hasattr(module, name):
            raise ValueError(f"{path} names the {part} class {name!r}, which {library} {module.__version__} does not "
                             f"have")


def refuse_non_finite(pipe, step: int, timestep, tensors: dict) -> dict:
    """A pipeline's ``callback_on_step_end``: ValueError as soon as the latents hold inf or NaN,
    so that no black or flat image is written as if it were one."""
    if not torch.isfinite(tensors["latents"]).all():
        raise ValueError(f"sampling step {step + 1} made latents that are not finite (inf or NaN): no image written; "
                         f"a smaller guidance scale, or float32 instead of float16, avoids the overflow")
    return tensors


def pipeline_configs(model: str) -> tuple[dict, dict] | None:
    """(U-Net config, VAE config) of the pipeline ``load_pipeline(model)`` gives, read without
    loading any weights; None where only loading can tell (a hub id)."""
    return resolve_model(model).pipeline_configs()


@contextlib.contextmanager
def quiet_loading():
    """Loading a pipeline with ``from_pretrained`` without diffusers' and transformers' progress
    bars, advice (install accelerate...) and deprecation notes; errors still show."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(module, module.get_verbosity(), module.is_progress_bar_enabled())
             for module in (diffusers_logging, transformers_logging)]
    try:
        for module, _, _ in saved:
            module.set_verbosity_error()
            module.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()
