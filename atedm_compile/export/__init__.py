"""Step-specialised export: one ONNX graph (and TensorRT engine) per schedule phase, sharing one
weights file, with ONNX Runtime and TensorRT backends and a U-Net that switches between them.

Example:
    >>> from atedm_compile.export import BuildConfig, build, load  # doctest: +SKIP
    >>> build(BuildConfig(model="tiny", num_steps=4), "out/tiny")  # doctest: +SKIP
    >>> unet = load("out/tiny")  # doctest: +SKIP
"""

from .backend import Backend
from .backends import BACKENDS, get_backend
from .build import BuildConfig, BuildPlan, BuildStage, StageRecord, build
from .check import check
from .lint import LintIssue, lint_file, lint_model
from .manifest import FORMAT_VERSION, Manifest, ManifestError, read_manifest, verify_artefacts
from .runtime import ExportedUNet, load

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "Backend",
    "BuildConfig",
    "BuildPlan",
    "BuildStage",
    "ExportedUNet",
    "LintIssue",
    "Manifest",
    "ManifestError",
    "StageRecord",
    "build",
    "check",
    "get_backend",
    "lint_file",
    "lint_model",
    "load",
    "read_manifest",
    "verify_artefacts",
]
