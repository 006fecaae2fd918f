"""The manifest that ties a build directory's artefacts to the model, the schedule and the tools
that made them (what each phase graph takes and returns is ``contract``).

``manifest.json`` is the only file a loader reads first; everything else is named and hashed there.
It is checked for meaning, not only for form, before anything trusts it: its values have the
types they should, its phases are the ones its schedule gives (names, step ranges, rules), each
phase's export key follows from the recorded settings, and a ``seal`` (the sha256 of all its other
content) catches any edit; each phase graph carries its phase name and export key in its ONNX
metadata, which ``verify_artefacts`` compares with the manifest (``meaning`` and ``artefacts``
hold those checks; this module re-exports them with the contract and the keys).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_atomically
from .artefacts import check_artefact, check_graph_metadata, verify_artefacts
from .contract import (CACHED_SUFFIX, EXPORT_KEY, FEATURES_NAME, FORMAT, FORMAT_VERSION, MANIFEST, OUTPUT_NAME,
                       PHASE_KEY, PRECISIONS, WEIGHTS, ManifestError, TensorSpec, io_specs, manifest_schedule,
                       phase_graphs, step_io_specs, used_inputs)
from .keys import build_settings, export_key, sha256_file, sha256_json
from .meaning import check_meaning


@dataclass
class Artefact:
    file: str
    sha256: str
    bytes: int

    @staticmethod
    def of(directory: Path, file: str) -> Artefact:
        path = directory / file
        return Artefact(file, sha256_file(path), path.stat().st_size)


@dataclass
class PhaseEntry:
    name: str
    start: int
    stop: int
    rules: list
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    export_key: str
    onnx: Artefact | None = None
    lint: str | None = None  # sha256 of the ONNX file the lint and checker passed on
    engine: Artefact | None = None
    engine_key: str | None = None
    # "full" or "cached" in a build with cached steps; None (and left out of the JSON, so builds
    # without a cache are written as before) in one without.
    role: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.role is None:
            del data["role"]
        data["inputs"] = {k: v.to_dict() for k, v in self.inputs.items()}
        data["outputs"] = {k: v.to_dict() for k, v in self.outputs.items()}
        return data

    @staticmethod
    def from_dict(data: dict) -> PhaseEntry:
        data = dict(data)
        data["inputs"] = {k: TensorSpec.from_dict(v) for k, v in data["inputs"].items()}
        data["outputs"] = {k: TensorSpec.from_dict(v) for k, v in data["outputs"].items()}
        for key in ("onnx", "engine"):
            if data.get(key) is not None:
                data[key] = Artefact(**data[key])
        return PhaseEntry(**data)


@dataclass
class Manifest:
    """Everything a loader needs to know about a build directory."""

    model: dict  # name, unet config, sha256 of the weights
    schedule: dict  # preset, num_steps, options
    pruning: dict
    batch: int
    height: int
    width: int
    latent: tuple[int, int]
    precision: str
    backend: str
    exporter: str
    opset: int
    tools: dict
    phases: list[PhaseEntry]
    vae_factor: int = 8
    weights: Artefact | None = None
    # content key -> {name, offset, length, dtype, shape} of every tensor in the weights file
    weights_index: dict = field(default_factory=dict)
    complete: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_steps(self) -> int:
        return self.schedule["num_steps"]

    def phase(self, name: str) -> PhaseEntry:
        for entry in self.phases:
            if entry.name == name:
                return entry
        raise ValueError(f"unknown phase {name!r}; this build has {[p.name for p in self.phases]}")

    def phase_at(self, step: int, role: str | None = None) -> PhaseEntry:
        """The graph of ``step``; in a build with cached steps, the one of ``role`` (default: full)."""
        for entry in self.phases:
            if entry.start <= step < entry.stop and entry.role in (role or "full", None):
                return entry
        raise ValueError(f"step {step} is outside the built steps 0..{self.num_steps - 1}"
                         + (f" or has no {role} graph" if role else ""))

    @property
    def cache(self):
        """The build's ``DeepCacheConfig`` (None: no cached steps)."""
        from ..config import DeepCacheConfig

        cache = self.schedule.get("cache")
        return DeepCacheConfig(**cache) if cache is not None else None

    def to_dict(self) -> dict:
        """The manifest as JSON data, sealed: ``seal`` is the sha256 of everything else in it."""
        data = {k: v for k, v in asdict(self).items() if k not in ("phases", "weights")}
        data = {"format": self.format, "format_version": self.format_version, **data}
        data["latent"] = list(self.latent)
        data["weights"] = asdict(self.weights) if self.weights else None
        data["phases"] = [p.to_dict() for p in self.phases]
        data["seal"] = seal(data)
        return data

    @staticmethod
    def from_dict(data: dict) -> Manifest:
        data = {k: v for k, v in data.items() if k != "seal"}
        data["phases"] = [PhaseEntry.from_dict(p) for p in data["phases"]]
        data["latent"] = tuple(data["latent"])
        if data.get("weights") is not None:
            data["weights"] = Artefact(**data["weights"])
        return Manifest(**data)

    def save(self, directory: Path) -> None:
        write_atomically(directory / MANIFEST, json.dumps(self.to_dict(), indent=2).encode())


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a build directory, after checking its format and version (not the artefacts)."""
    path = Path(directory) / MANIFEST
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ManifestError(f"{directory} is a file, not a build directory (run `atedm-compile build --out DIR`)")
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: not an atedm-compile build directory (run `atedm-compile build`)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path} is not UTF-8 text (byte {error.start}): not an atedm-compile export "
                            f"manifest") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} holds {json.dumps(data)[:40]}, not an atedm-compile export manifest (a JSON "
                            f"object)")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an atedm-compile export manifest (format {data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {data.get('format_version')!r}; this atedm-compile reads version "
            f"{FORMAT_VERSION}: rebuild the directory with `atedm-compile build`"
        )
    _check_types(data, _MANIFEST_TYPES, f"{path}: ")
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as error:  # a field this version does not know
        raise ManifestError(f"{path} is malformed: {error}; rebuild with `atedm-compile build`") from None
    check_meaning(manifest, path)
    if data["seal"] != seal(data):
        raise ManifestError(f"{path} was edited after the build (its content no longer matches its seal): "
                            f"rebuild with `atedm-compile build`")
    return manifest


def seal(data: dict) -> str:
    """sha256 of a manifest's JSON data without its ``seal``."""
    return sha256_json({k: v for k, v in data.items() if k != "seal"})


# Expected JSON types: a type, a tuple of types (None: null allowed), a nested dict, or [item type].
_INT = (int,)
_SHAPE = [int]
_SPEC = {"shape": _SHAPE, "dtype": str}
_ARTEFACT = {"file": str, "sha256": str, "bytes": _INT}
_PHASE_TYPES = {"name": str, "start": _INT, "stop": _INT, "rules": [list], "inputs": {str: _SPEC},
                "outputs": {str: _SPEC}, "export_key": str, "onnx": (_ARTEFACT, None), "lint": (str, None),
                "engine": (_ARTEFACT, None), "engine_key": (str, None)}
_MANIFEST_TYPES = {
    "model": {"name": str, "config": dict, "config_sha256": str}, "schedule": {"preset": str, "num_steps": _INT,
                                                                              "options": dict},
    "pruning": dict, "batch": _INT, "height": _INT, "width": _INT, "latent": [int], "precision": str,
    "backend": str, "exporter": str, "opset": _INT, "tools": {"atedm-compile": str}, "phases": [_PHASE_TYPES],
    "vae_factor": _INT, "weights": (_ARTEFACT, None),
    "weights_index": {str: {"name": str, "offset": _INT, "length": _INT, "dtype": str, "shape": _SHAPE}},
    "complete": bool, "seal": str,
}


def _check_types(value, expected, where: str) -> None:
    """ManifestError naming the first value whose JSON type is not the expected one."""
    if isinstance(expected, tuple) and None in expected:
        if value is None:
            return
        expected = next(e for e in expected if e is not None)
    if isinstance(expected, dict) and len(expected) == 1 and next(iter(expected)) is str:
        _check_types(value, dict, where)  # a mapping of names to values of one kind
        for name, item in value.items():
            _check_types(item, expected[str], f"{where}{name}.")
    elif isinstance(expected, dict):
        _check_types(value, dict, where)
        for name, kind in expected.items():
            if name not in value:
                raise ManifestError(f"{where}{name} is missing; rebuild with `atedm-compile build`")
            _check_types(value[name], kind, f"{where}{name}.")
    elif isinstance(expected, list):
        _check_types(value, list, where)
        for i, item in enumerate(value):
            _check_types(item, expected[0], f"{where}{i}.")
    else:
        kinds = expected if isinstance(expected, tuple) else (expected,)
        # JSON true / false are not numbers here.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join({int: "an integer", str: "a string", bool: "true or false", dict: "an object",
                                 list: "a list"}[k] for k in kinds)
            raise ManifestError(f"{where.rstrip('.')} is {json.dumps(value)[:60]}, expected {names}; "
                                f"rebuild with `atedm-compile build`")



__all__ = [
    "CACHED_SUFFIX",
    "EXPORT_KEY",
    "FEATURES_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "OUTPUT_NAME",
    "PHASE_KEY",
    "PRECISIONS",
    "WEIGHTS",
    "Artefact",
    "Manifest",
    "ManifestError",
    "PhaseEntry",
    "TensorSpec",
    "build_settings",
    "check_artefact",
    "check_graph_metadata",
    "check_meaning",
    "export_key",
    "io_specs",
    "manifest_schedule",
    "phase_graphs",
    "read_manifest",
    "seal",
    "sha256_file",
    "sha256_json",
    "step_io_specs",
    "used_inputs",
    "verify_artefacts",
    "write_atomically",
]
