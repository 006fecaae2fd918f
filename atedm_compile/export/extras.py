"""The optional dependencies of the export commands, and the pip extra that installs each."""

from __future__ import annotations

import importlib

EXTRAS = {"onnx": ("onnx", "onnxruntime"), "tensorrt": ("tensorrt", "polygraphy")}


class UnavailableError(RuntimeError):
    """What was asked for cannot run here: an optional dependency or the hardware it needs is missing."""


class MissingExtraError(UnavailableError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """MissingExtraError unless every module of ``extra`` (or ``modules``) imports."""
    missing = []
    for module in modules or EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}, not installed here: "
                                f"pip install \"atedm-compile[{extra}]\"")
