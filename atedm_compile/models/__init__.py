"""Models: what a model name means (``resolve_model``), the registry of named models, and loading.

A model name is a U-Net config (``UNET_CONFIGS``: random weights; with a whole pipeline where
``PIPELINES`` has one), a shipped trained model (``TRAINED_MODELS``: a folder under ``weights/``,
loaded by ``load_trained_pipeline``) or a diffusers folder / hub id. ``resolve_model`` decides
which; every other part of the package asks it, never the names or the folders.

By job: ``source.py`` (``resolve_model`` and the ``ModelSource`` kinds; ``unet_config``,
``vae_factor``, ``load_pipeline``, ``pipeline_configs``, ``build_unet`` over it), ``configs.py``
(the registry and what a config says about inputs and sizes), ``unets.py`` (a random-weight U-Net
from a config), ``tiny.py`` (the tiny pipelines built offline, ``PIPELINES``), ``folders.py`` (trained model folders), ``loading.py`` (diffusers
loading, quietly). ``load_pipeline`` keeps the real ``from_pretrained`` path for users who have
weights. Everything is importable from ``atedm_compile.models``.
"""

from __future__ import annotations

from .configs import (SD15_UNET, SD21_UNET, SDXL_BASE_UNET, SDXL_TURBO_UNET, TEXT_LENGTH, TIME_IDS,
                      TINY_SD15_UNET, TINY_SDXL_UNET, TINY_SHAPES, TINY_SHAPES_XL, TINY_VAE, TRAINED_MODELS,
                      UNET_CONFIGS, WEIGHTS, BuiltPipeline, check_image_size, own_height, unet_input_shapes,
                      vae_factor_of)
from .folders import (build_pipeline, load_trained_pipeline, load_unet, load_weights, model_folder,
                      read_config, read_json_object)
from .loading import quiet_loading, refuse_non_finite
from .source import (BuiltInModel, DiffusersModel, ModelSource, TrainedModel, build_unet, load_pipeline,
                     pipeline_configs, resolve_model, unet_config, vae_factor)
from .tiny import PIPELINES, tiny_sd15_pipeline, tiny_sdxl_pipeline, tiny_tokenizer
from .unets import initialise_on, unet_from_config

__all__ = [
    "PIPELINES", "SD15_UNET", "SD21_UNET", "SDXL_BASE_UNET", "SDXL_TURBO_UNET", "TEXT_LENGTH", "TIME_IDS",
    "TINY_SD15_UNET", "TINY_SDXL_UNET", "TINY_SHAPES", "TINY_SHAPES_XL", "TINY_VAE", "TRAINED_MODELS", "UNET_CONFIGS",
    "WEIGHTS", "BuiltInModel", "BuiltPipeline", "DiffusersModel", "ModelSource", "TrainedModel", "build_pipeline",
    "build_unet", "check_image_size", "initialise_on", "load_pipeline", "load_trained_pipeline",
    "load_unet", "load_weights", "model_folder", "own_height", "pipeline_configs", "quiet_loading", "read_config",
    "read_json_object", "refuse_non_finite", "resolve_model", "tiny_sd15_pipeline", "tiny_sdxl_pipeline",
    "tiny_tokenizer", "unet_config", "unet_from_config", "unet_input_shapes", "vae_factor", "vae_factor_of",
]
