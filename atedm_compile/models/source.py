"""What a model name means, decided in one place: ``resolve_model(name_or_path)``.

A model is given in one of three ways, tried in this order:

- a built-in config (a key of ``UNET_CONFIGS``): a U-Net with random weights drawn from a seed,
  for FLOPs and builds; those in ``PIPELINES`` (``tiny``) are also a whole pipeline to sample with;
- a shipped trained model (``TRAINED_MODELS``) or a folder laid out like one (``config.json``
  with the component configs, ``model.safetensors``);
- anything else: a diffusers pipeline folder or U-Net folder here, or a hub id in the local cache
  (``from_pretrained``: only loading can tell what a hub id is).

The object returned knows the U-Net config, the VAE factor, the identity a build is keyed by and
how to load the U-Net or the pipeline; ``flops``, ``generate``, ``build``, ``run`` and
``evaluate`` ask it (through ``unet_config``, ``vae_factor``, ``load_pipeline``,
``pipeline_configs`` and ``export.build.model_identity``) and never look at the name themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import sha256_file, sha256_json
from .configs import TRAINED_MODELS, UNET_CONFIGS, BuiltPipeline, vae_factor_of
from .folders import _check_configs, load_trained_pipeline, load_unet, model_folder, read_config, read_json_object
from .loading import _check_model_index, quiet_loading
from .tiny import PIPELINES
from .unets import unet_from_config


class ModelSource:
    """A model, whatever named it. Subclasses: ``BuiltInModel``, ``TrainedModel``, ``DiffusersModel``."""

    kind = "model"

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def unet_config(self) -> dict:
        """The U-Net's config (a copy), as written where the model comes from."""
        raise NotImplementedError

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell, per side."""
        raise NotImplementedError

    @property
    def has_pipeline(self) -> bool:
        """Whether there is a whole pipeline (text encoders, VAE, scheduler) to sample with."""
        return True

    def pipeline_configs(self) -> tuple[dict, dict] | None:
        """(U-Net config, VAE config) of the pipeline ``load_pipeline`` gives, read without loading
        any weights; None where only loading can tell (a hub id)."""
        raise NotImplementedError

    def _identity(self, seed: int) -> dict:
        raise NotImplementedError

    def identity(self, seed: int = 0) -> dict:
        """What a build of this model is keyed by, without loading its weights: a built-in config by
        name, seed and how its weights are drawn; weights on disk by the sha256 of their files;
        every one also by the sha256 of its U-Net config with the constructor's defaults spelled
        out (``full_unet_config``)."""
        return {**self._identity(seed), "config_sha256": sha256_json(self.full_unet_config())}

    def full_unet_config(self) -> dict:
        """``unet_config`` with every key it leaves to ``UNet2DConditionModel``'s defaults spelled out
        (pipelines read such keys: ``time_cond_proj_dim``...), diffusers' private keys left out."""
        import inspect

        from diffusers import UNet2DConditionModel

        defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        config = self.unet_config()
        return json.loads(json.dumps({**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}))

    def load_unet(self, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """The U-Net alone, with its weights (a built-in config's drawn from ``seed``), in eval mode
        without gradients, on ``device`` in ``dtype``."""
        from ..devices import cast

        with quiet_loading():
            unet = self._load_unet(seed, dtype)
        return cast(unet.eval().requires_grad_(False), device, dtype)

    def _load_unet(self, seed: int, dtype: torch.dtype):
        raise NotImplementedError

    def load_pipeline(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
        """The whole pipeline on ``device`` in ``dtype`` (a built-in config's weights drawn from ``seed``)."""
        from ..devices import cast

        pipe = self._load_pipeline(dtype, seed)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                cast(component, device, dtype)
        return pipe

    def _load_pipeline(self, dtype: torch.dtype, seed: int):
        raise NotImplementedError


class BuiltInModel(ModelSource):
    """A key of ``UNET_CONFIGS``: random weights from a seed; a pipeline where ``PIPELINES`` has one."""

    kind = "built-in config"

    def unet_config(self) -> dict:
        return dict(UNET_CONFIGS[self.name])

    @property
    def _pipeline(self) -> BuiltPipeline | None:
        return PIPELINES.get(self.name)

    @property
    def vae_factor(self) -> int:
        # A bare U-Net config stands for its family's pipeline: the Stable Diffusion VAE's 8.
        return vae_factor_of(self._pipeline.vae if self._pipeline else None)

    @property
    def has_pipeline(self) -> bool:
        return self._pipeline is not None

    def _refuse_bare(self) -> None:
        if self._pipeline is None:
            raise ValueError(f"{self.name!r} is a bare U-Net config (random weights, no text encoders or VAE): "
                             f"sampling needs a pipeline: {', '.join([*PIPELINES, *TRAINED_MODELS])}, a pipeline "
                             f"folder or a hub id")

    def pipeline_configs(self) -> tuple[dict, dict]:
        self._refuse_bare()
        return self.unet_config(), dict(self._pipeline.vae)

    def _identity(self, seed: int) -> dict:
        # "drawn": the random weights are drawn at the build's precision (an fp16 build's are not the
        # fp32 draw cast down, as before); naming it keeps older builds' phases from being reused.
        return {"name": self.name, "seed": seed, "drawn": "at-precision"}

    def _load_unet(self, seed: int, dtype: torch.dtype):
        # Drawn at the target precision: SD-XL's weights would take 10 GB in float32 before the
        # cast. An fp16 U-Net's random weights are therefore not an fp32 one's, cast.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return unet_from_config(self.unet_config(), seed=seed)
        finally:
            torch.set_default_dtype(previous)

    def _load_pipeline(self, dtype: torch.dtype, seed: int):
        self._refuse_bare()
        return self._pipeline.build(seed)


class TrainedModel(ModelSource):
    """A shipped trained model (``TRAINED_MODELS``) or a folder laid out like one."""

    kind = "trained model"

    def __init__(self, name: str, folder: Path):
        super().__init__(name)
        self.folder = folder

    def _config(self) -> dict:
        return read_config(self.folder)

    def unet_config(self) -> dict:
        return dict(self._config()["unet"])

    @property
    def vae_factor(self) -> int:
        return vae_factor_of(self._config()["vae"])

    def pipeline_configs(self) -> tuple[dict, dict]:
        config = self._config()
        return dict(config["unet"]), dict(config["vae"])

    def _identity(self, seed: int) -> dict:
        return {"name": self.name if self.name in TRAINED_MODELS else str(self.folder.resolve()),
                "files": {name: sha256_file(self.folder / name) for name in ("config.json", "model.safetensors")}}

    def _load_unet(self, seed: int, dtype: torch.dtype):
        return load_unet(self.folder)

    def _load_pipeline(self, dtype: torch.dtype, seed: int):
        return load_trained_pipeline(self.folder)


class DiffusersModel(ModelSource):
    """A diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``...), a U-Net folder
    (its ``config.json`` and weights), or a hub id (``from_pretrained`` reads the local cache)."""

    kind = "diffusers model"

    @property
    def root(self) -> Path:
        return Path(self.name)

    def _unet_dir(self) -> Path:
        """The folder of the U-Net's config and weights; ValueError where there is none here."""
        for folder in (self.root / "unet", self.root):
            if (folder / "config.json").is_file():
                return folder
        raise ValueError(f"unknown model config {self.name!r}: give a config name ({', '.join(sorted(UNET_CONFIGS))}), "
                         f"a trained model ({', '.join(TRAINED_MODELS)}) or the folder of one, or a directory with a "
                         f"diffusers U-Net (config.json in it or in unet/)")

    def unet_config(self) -> dict:
        path = self._unet_dir() / "config.json"
        try:
            config = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(config, dict) or "down_block_types" not in config:
            raise ValueError(f"{path} is not the config of a diffusers U-Net")
        return config

    @property
    def vae_factor(self) -> int:
        path = self.root / "vae" / "config.json"
        return vae_factor_of(json.loads(path.read_text()) if path.is_file() else None)

    def pipeline_configs(self) -> tuple[dict, dict] | None:
        paths = [self.root / part / "config.json" for part in ("unet", "vae")]
        if not all(path.is_file() for path in paths):
            return None
        unet, vae = (read_json_object(path) for path in paths)
        _check_configs(unet, vae, *paths)
        return unet, vae

    def _identity(self, seed: int) -> dict:
        unet_dir = self._unet_dir()
        files = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        return {"name": str(self.root.resolve()), "files": {p.name: sha256_file(p) for p in files}}

    def _load_unet(self, seed: int, dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        unet_dir = self._unet_dir()
        return UNet2DConditionModel.from_pretrained(self.root, subfolder="unet" if unet_dir != self.root else None,
                                                    torch_dtype=dtype)

    def load_pipeline(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
        # from_pretrained loads in ``dtype`` itself (and keeps the modules diffusers keeps in float32).
        model = self.name
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"model {model!r} is a file; give a diffusers pipeline folder (with model_index.json)")
        if (self.root / "model_index.json").is_file():
            _check_model_index(self.root / "model_index.json")
        with quiet_loading():
            from diffusers import DiffusionPipeline

            try:
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, use_safetensors=True)
            except (OSError, ValueError) as error:
                where = ("a folder here, but not a diffusers pipeline" if self.root.is_dir()
                         else "not a folder here, nor a hub id in the local cache")
                said = str(error).splitlines()[0] if str(error) else type(error).__name__
                said = said if len(said) <= 160 else said[:157] + "..."
                raise ValueError(f"cannot load model {model!r}: {where}. Models: "
                                 f"{', '.join([*PIPELINES, *TRAINED_MODELS])}, a pipeline folder or a cached hub id. "
                                 f"diffusers said: {said}") from None
        return pipe.to(device)


def resolve_model(name_or_path: str | Path) -> ModelSource:
    """The model ``name_or_path`` names (see the module docstring for the order); ValueError for
    what can name no model (an empty name, a number) or a broken trained-model folder.

    Example:
        >>> source = resolve_model("tiny")
        >>> source.kind, source.vae_factor, source.unet_config()["block_out_channels"]
        ('built-in config', 8, [32, 64, 128])
        >>> resolve_model("tiny-shapes").kind
        'trained model'
    """
    if isinstance(name_or_path, Path):
        name_or_path = str(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model {name_or_path!r} is not a model name or path: give a config name "
                         f"({', '.join(sorted(UNET_CONFIGS))}), a trained model or its folder, a diffusers folder or "
                         f"a hub id")
    if name_or_path in UNET_CONFIGS:
        return BuiltInModel(name_or_path)
    folder = model_folder(name_or_path)
    if folder is not None:
        return TrainedModel(name_or_path, folder)
    return DiffusersModel(name_or_path)



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




def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """The pipeline for ``model`` on ``device`` in ``dtype`` (``resolve_model``): a shipped trained
    model (``TRAINED_MODELS``: ``"tiny-shapes"``, ``"tiny-shapes-xl"``, trained on synthetic shapes)
    or the folder of one, a built-in pipeline (``PIPELINES``: ``"tiny"``, random weights from
    ``seed``) or a local path / hub id loaded with diffusers' ``DiffusionPipeline.from_pretrained``
    (SD-XL and SD 1.x / 2.x pipelines)."""
    return resolve_model(model).load_pipeline(dtype, device, seed)


def pipeline_configs(model: str) -> tuple[dict, dict] | None:
    """(U-Net config, VAE config) of the pipeline ``load_pipeline(model)`` gives, read without
    loading any weights; None where only loading can tell (a hub id)."""
    return resolve_model(model).pipeline_configs()


def build_unet(name_or_config: str | dict, device: str | torch.device = "cpu", seed: int = 0,
               dtype: torch.dtype = torch.float32):
    """A ``UNet2DConditionModel`` of a model's config (its name: ``resolve_model``) or of a given
    config, randomly initialised from ``seed``, in ``dtype`` (``unets.unet_from_config``).

    On ``device="meta"`` no memory is allocated: enough for FLOPs counting.
    """
    config = resolve_model(name_or_config).unet_config() if isinstance(name_or_config, str) else name_or_config
    return unet_from_config(config, device, seed, dtype)
