"""The export contract as data: what each phase graph takes and returns, and the manifest that
ties a build directory's artefacts to the model, the schedule and the tools that made them.

``manifest.json`` is the only file a loader reads first; everything else is named and hashed there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "atedm-compile/export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
TEXT_LENGTH = 77
PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
OUTPUT_NAME = "latent"


class ManifestError(ValueError):
    """A build directory that cannot be used as it is: wrong format version, a missing or altered
    artefact, an incomplete build."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # numpy name: float32, float16

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(data: dict) -> TensorSpec:
        return TensorSpec(tuple(data["shape"]), data["dtype"])


def io_specs(unet_config: dict, batch: int, latent_height: int, latent_width: int,
             precision: str) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Static input and output specs of one phase graph.

    The timestep stays a float32 scalar in fp16 graphs: the U-Net's sinusoidal embedding runs in
    float32 and casts to the sample dtype itself. SD 1.5 / 2.1 U-Nets have no ``text_embeds`` /
    ``time_ids``.
    """
    dtype = "float16" if precision == "fp16" else "float32"
    channels = unet_config["in_channels"]
    inputs = {
        "sample": TensorSpec((batch, channels, latent_height, latent_width), dtype),
        "timestep": TensorSpec((), "float32"),
        "encoder_hidden_states": TensorSpec((batch, TEXT_LENGTH, unet_config["cross_attention_dim"]), dtype),
    }
    if unet_config.get("addition_embed_type") == "text_time":
        time_ids = 6
        text_dim = unet_config["projection_class_embeddings_input_dim"] - time_ids * unet_config[
            "addition_time_embed_dim"]
        inputs["text_embeds"] = TensorSpec((batch, text_dim), dtype)
        inputs["time_ids"] = TensorSpec((batch, time_ids), dtype)
    outputs = {OUTPUT_NAME: TensorSpec((batch, unet_config["out_channels"], latent_height, latent_width), dtype)}
    return inputs, outputs


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

    def to_dict(self) -> dict:
        data = asdict(self)
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

    def phase_at(self, step: int) -> PhaseEntry:
        for entry in self.phases:
            if entry.start <= step < entry.stop:
                return entry
        raise ValueError(f"step {step} is outside the built steps 0..{self.num_steps - 1}")

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("phases", "weights")}
        data = {"format": self.format, "format_version": self.format_version, **data}
        data["latent"] = list(self.latent)
        data["weights"] = asdict(self.weights) if self.weights else None
        data["phases"] = [p.to_dict() for p in self.phases]
        return data

    @staticmethod
    def from_dict(data: dict) -> Manifest:
        data = dict(data)
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
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: not an atedm-compile build directory (run `atedm-compile build`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an atedm-compile export manifest (format {data.get('format')!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format version {data.get('format_version')!r}; this atedm-compile reads version "
            f"{FORMAT_VERSION}: rebuild the directory with `atedm-compile build`"
        )
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as error:
        raise ManifestError(f"{path} is malformed: {error}") from None


def verify_artefacts(directory: Path, manifest: Manifest, engines: bool = True) -> None:
    """ManifestError unless the build is complete and every artefact exists with its recorded hash."""
    directory = Path(directory)
    if not manifest.complete:
        raise ManifestError(f"{directory} holds an incomplete build (interrupted?): run `atedm-compile build` again")
    artefacts = [manifest.weights] if manifest.weights else []
    for phase in manifest.phases:
        artefacts.append(phase.onnx)
        if engines and manifest.backend == "tensorrt":
            artefacts.append(phase.engine)
    for artefact in artefacts:
        if artefact is None:
            raise ManifestError(f"{directory / MANIFEST} lists a phase without its artefact: rebuild")
        check_artefact(directory, artefact)


def check_artefact(directory: Path, artefact: Artefact) -> None:
    path = Path(directory) / artefact.file
    if not path.is_file():
        raise ManifestError(f"artefact {path} is missing: rebuild with `atedm-compile build`")
    actual = sha256_file(path)
    if actual != artefact.sha256:
        raise ManifestError(
            f"artefact {path} was altered: sha256 {actual[:16]}... but the manifest expects "
            f"{artefact.sha256[:16]}...; rebuild with `atedm-compile build`"
        )


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp: str | Path, path: Path) -> None:
    """Rename a finished temporary file onto ``path`` with the permissions a plain ``open`` would
    give it (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def tool_versions() -> dict[str, str]:
    """Versions of the tools an artefact depends on (absent ones left out)."""
    import importlib.metadata

    versions = {}
    for package in ("atedm-compile", "torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu",
                    "tensorrt", "polygraphy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "atedm-compile" not in versions:
        from .. import __version__

        versions["atedm-compile"] = __version__
    return versions


__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "MANIFEST",
    "PRECISIONS",
    "Artefact",
    "Manifest",
    "ManifestError",
    "PhaseEntry",
    "TensorSpec",
    "io_specs",
    "read_manifest",
    "verify_artefacts",
]
