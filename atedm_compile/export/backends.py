"""The export backends, keyed by the name ``--backend`` takes and the manifest records: the one
place that maps a backend's name to what it does (``backend.Backend``). To add one, see
docs/architecture.md ("A backend")."""

from __future__ import annotations

from .backend import Backend
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (OnnxRuntimeBackend(), TensorRTBackend())}
DEFAULT_BACKEND = OnnxRuntimeBackend.name
# What every build depends on whatever runs it; each backend adds its own (``Backend.packages``).
_PACKAGES = ("atedm-compile", "torch", "diffusers", "onnx")


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError naming the allowed ones for any other."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend={name!r} is not allowed; choose one of {list(BACKENDS)}") from None


def tool_versions() -> dict[str, str]:
    """Versions of the tools an artefact depends on (absent ones left out)."""
    import importlib.metadata

    versions = {}
    for package in _PACKAGES + tuple(p for backend in BACKENDS.values() for p in backend.packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "atedm-compile" not in versions:
        from .. import __version__

        versions["atedm-compile"] = __version__
    return versions
