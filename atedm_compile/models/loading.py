"""Loading pipelines with diffusers quietly, checking a pipeline folder's classes first, and
refusing a sampling step that overflowed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .folders import read_json_object


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
