"""The optional dependencies of the export commands, and the pip extra that installs each; a
torchvision that does not import with the installed torch, set aside."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys

# What every export command needs; each backend names its own extra and modules (``Backend.extra``).
EXTRAS = {"onnx": ("onnx", "onnxruntime")}


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


_torchvision_problem: list[str] = []


def set_aside_broken_torchvision() -> str | None:
    """What is wrong with the installed torchvision, where it does not import with this torch (a
    build for another torch or another CUDA: pip can put one beside a CPU torch), else None.

    Such a torchvision is then hidden, as if not installed: transformers and diffusers import
    torchvision wherever they find it, and would fail every command, even those that never use it.
    """
    if _torchvision_problem or "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return _torchvision_problem[0] if _torchvision_problem else None
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # RuntimeError (an operator it registers is missing), ImportError, OSError
        import torch

        said = (str(error).strip().splitlines() or [""])[0][:160]
        try:
            version = f"torchvision {importlib.metadata.version('torchvision')}"
        except importlib.metadata.PackageNotFoundError:
            version = "the torchvision found"
        _torchvision_problem.append(f"{version} does not import with torch {torch.__version__} "
                                    f"({type(error).__name__}: {said})")
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # find_spec now says "not installed", import raises ImportError
        return _torchvision_problem[0]
    return None
