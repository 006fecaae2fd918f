"""The export contract as data: what each phase graph takes and returns, and the manifest that
ties a build directory's artefacts to the model, the schedule and the tools that made them.

``manifest.json`` is the only file a loader reads first; everything else is named and hashed there.
It is checked for meaning, not only for form, before anything trusts it: its values have the
types they should, its phases are the ones its schedule gives (names, step ranges, rules), each
phase's export key follows from the recorded settings, and a ``seal`` (the sha256 of all its other
content) catches any edit; each phase graph carries its phase name and export key in its ONNX
metadata, which ``verify_artefacts`` compares with the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_atomically
from ..models import unet_input_shapes

FORMAT = "atedm-compile/export"
FORMAT_VERSION = 2  # 2: seal, vae_factor, config_sha256 for every model, phase metadata in the graphs
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
PRECISIONS = ("fp32", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
OUTPUT_NAME = "latent"
# The deep features a full-step graph of a build with cached steps also returns, and a
# cached-step graph takes (``caching.FEATURES_NAME``).
FEATURES_NAME = "deep_features"
CACHED_SUFFIX = ".cached"
# ONNX metadata_props of each phase graph: which phase it is and the settings it was made from.
PHASE_KEY = "atedm.phase"
EXPORT_KEY = "atedm.export_key"


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
    shapes = unet_input_shapes(unet_config, batch, latent_height, latent_width)
    inputs = {name: TensorSpec(shape, "float32" if name == "timestep" else dtype) for name, shape in shapes.items()}
    outputs = {OUTPUT_NAME: TensorSpec((batch, unet_config["out_channels"], latent_height, latent_width), dtype)}
    return inputs, outputs


def step_io_specs(unet_config: dict, batch: int, latent_height: int, latent_width: int, precision: str,
                  role: str | None, branch: int | None) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """``io_specs`` of a graph in a build with cached steps: a ``full`` graph also returns the deep
    features at ``branch`` (``caching.features_shape``), a ``cached`` one takes them as its last
    input. ``role`` None: a build without cached steps (``io_specs`` as it is)."""
    inputs, outputs = io_specs(unet_config, batch, latent_height, latent_width, precision)
    if role is None:
        return inputs, outputs
    from ..caching import features_shape

    features = TensorSpec(features_shape(unet_config, branch, batch, latent_height, latent_width),
                          outputs[OUTPUT_NAME].dtype)
    if role == "full":
        return inputs, {**outputs, FEATURES_NAME: features}
    return {**inputs, FEATURES_NAME: features}, outputs


def used_inputs(model, specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """``specs`` without the inputs the ONNX graph ``model`` does not take: the exporter leaves
    out an input no layer reads (a cached step cut below every cross-attention block reads no
    ``encoder_hidden_states``), and the manifest lists what the graph takes (a TensorRT profile
    names exactly those)."""
    names = {value.name for value in model.graph.input}
    return {name: spec for name, spec in specs.items() if name in names}


def phase_graphs(schedule) -> list[tuple[str, object, str | None]]:
    """(graph name, schedule phase, role) of every graph a build of ``schedule`` holds: one per
    phase without cached steps (role None); with them, per phase a ``full`` graph under the
    phase's name (every phase has one: the first call of a run is full, wherever it starts) and,
    where the cache rule caches one of its steps, a ``cached`` graph named ``<phase>.cached``."""
    if schedule.cache is None:
        return [(phase.name, phase, None) for phase in schedule.phases]
    graphs = []
    for phase in schedule.phases:
        graphs.append((phase.name, phase, "full"))
        if any(schedule.role_at(step) == "cached" for step in phase.steps):
            graphs.append((phase.name + CACHED_SUFFIX, phase, "cached"))
    return graphs


def manifest_schedule(manifest: Manifest):
    """The ``Schedule`` a manifest records (preset, steps, options and, where set, the cache)."""
    from ..config import DeepCacheConfig
    from ..schedule import make_schedule

    cache = manifest.schedule.get("cache")
    return make_schedule(manifest.schedule["preset"], manifest.num_steps, **manifest.schedule["options"],
                         cache=DeepCacheConfig(**cache) if cache is not None else None)


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


def export_key(manifest: Manifest, rules: list, inputs: dict[str, TensorSpec], role: str | None = None) -> str:
    """What one phase graph is made from: the model, precision, exporter, opset and tool versions,
    the phase's rules, the pruning settings and the input specs (not its step range: the same graph
    serves any). In a build with cached steps, also the graph's role and the cache's branch (not
    its interval or spacing, which decide only which graph a step runs). A graph is re-exported
    when its key changes."""
    content = {"format": FORMAT_VERSION, "settings": build_settings(manifest), "rules": rules,
               "pruning": manifest.pruning, "inputs": {k: v.to_dict() for k, v in inputs.items()},
               "atedm": manifest.tools["atedm-compile"]}
    if role is not None:  # builds without a cache keep the keys they had
        content["step"] = {"role": role, "branch": manifest.schedule["cache"]["branch"]}
    return sha256_json(content)


def build_settings(manifest: Manifest) -> dict:
    """What every artefact of a build depends on: when it changes, nothing of an older build is reused."""
    identity = {k: v for k, v in manifest.model.items() if k != "config"}
    return {"model": identity, "precision": manifest.precision, "exporter": manifest.exporter,
            "opset": manifest.opset, "torch": manifest.tools.get("torch")}


def check_meaning(manifest: Manifest, path: Path | str = MANIFEST) -> None:
    """ManifestError unless the manifest agrees with itself: the phases are those its schedule
    gives, the shapes follow from its batch and size, each export key from its settings."""
    from ..config import PruningConfig

    def fail(message: str):
        raise ManifestError(f"{path}: {message}; rebuild with `atedm-compile build`")

    for name, value, allowed in (("precision", manifest.precision, PRECISIONS),
                                 ("backend", manifest.backend, BACKENDS)):
        if value not in allowed:
            fail(f"{name} {value!r} is not one of {list(allowed)}")
    if sha256_json(manifest.model["config"]) != manifest.model["config_sha256"]:
        fail("the model config does not match its recorded sha256")
    try:
        PruningConfig(**manifest.pruning)
        schedule = manifest_schedule(manifest)
        graphs = phase_graphs(schedule)  # the cache rule against the step count too
    except (TypeError, ValueError) as error:
        fail(f"its schedule or pruning settings are not valid ({error})")
    expected = {name: (phase, role) for name, phase, role in graphs}
    listed = [p.name for p in manifest.phases]
    for name, phase, role in graphs:
        if name not in listed:
            fail(f"phase {name!r} (steps {phase.start}-{phase.stop - 1} of schedule {schedule.name!r} for "
                 f"{schedule.num_steps} steps) is missing; the manifest lists {listed}")
    for entry in manifest.phases:
        phase, role = expected.get(entry.name, (None, None))
        if phase is None or listed.count(entry.name) > 1:
            fail(f"phase {entry.name!r} is not a phase of schedule {schedule.name!r} for {schedule.num_steps} steps "
                 f"(or is listed twice), whose phases are {list(expected)}")
        if entry.role != role:
            fail(f"phase {entry.name!r} has role {entry.role!r}, but the schedule gives it {role!r}")
        if (entry.start, entry.stop) != (phase.start, phase.stop):
            fail(f"phase {entry.name!r} covers steps {entry.start}-{entry.stop - 1}, but schedule {schedule.name!r} "
                 f"for {schedule.num_steps} steps gives it steps {phase.start}-{phase.stop - 1}")
        if [list(r) for r in phase.rules] != entry.rules:
            fail(f"phase {entry.name!r} has rules {entry.rules}, but the schedule gives "
                 f"{[list(r) for r in phase.rules]}")
    latent = (manifest.height // max(1, manifest.vae_factor), manifest.width // max(1, manifest.vae_factor))
    if manifest.vae_factor < 1 or tuple(manifest.latent) != latent or manifest.batch < 1:
        fail(f"batch {manifest.batch}, size {manifest.height}x{manifest.width} and latent {list(manifest.latent)} "
             f"(VAE factor {manifest.vae_factor}) do not agree")
    branch = schedule.cache.branch if schedule.cache is not None else None
    for entry in manifest.phases:
        try:
            inputs, outputs = step_io_specs(manifest.model["config"], manifest.batch, *manifest.latent,
                                            manifest.precision, entry.role, branch)
        except (KeyError, TypeError) as error:
            fail(f"the model config lacks {error}")
        except ValueError as error:  # a branch this U-Net does not have
            fail(str(error))
        taken = {name: spec for name, spec in inputs.items() if name in entry.inputs}
        if entry.role is not None:  # a full or cached step's graph may not read every input (used_inputs)
            inputs = taken if list(entry.inputs) == list(taken) and "sample" in taken else inputs
        if entry.inputs != inputs or entry.outputs != outputs:
            fail(f"phase {entry.name!r} lists input or output shapes that its batch, size and precision do not give")
        expected_inputs = step_io_specs(manifest.model["config"], manifest.batch, *manifest.latent,
                                        manifest.precision, entry.role, branch)[0]
        if entry.export_key != export_key(manifest, entry.rules, expected_inputs, entry.role):
            fail(f"the export key of phase {entry.name!r} does not follow from the recorded settings")
    for artefact in [manifest.weights] + [a for e in manifest.phases for a in (e.onnx, e.engine)]:
        if artefact is not None and (Path(artefact.file).is_absolute() or ".." in Path(artefact.file).parts):
            fail(f"artefact {artefact.file!r} is not a path inside the build directory")
    import math

    import numpy as np

    size = manifest.weights.bytes if manifest.weights else 0
    for entry in manifest.weights_index.values():
        if entry["offset"] < 0 or entry["offset"] + entry["length"] > size:
            fail(f"weight {entry['name']!r} lies outside {WEIGHTS} ({size} bytes)")
        try:
            itemsize = np.dtype(entry["dtype"]).itemsize
        except TypeError:
            fail(f"weight {entry['name']!r} has an unknown dtype {entry['dtype']!r}")
        if math.prod(entry["shape"]) * itemsize != entry["length"]:
            fail(f"weight {entry['name']!r} of shape {entry['shape']} does not take {entry['length']} bytes")


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
    for phase in manifest.phases:
        check_graph_metadata(directory / phase.onnx.file, phase)


def check_graph_metadata(path: Path, phase: PhaseEntry) -> None:
    """ManifestError unless the graph at ``path`` says it is ``phase`` (name and export key)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    found = (props.get(PHASE_KEY), props.get(EXPORT_KEY))
    if found != (phase.name, phase.export_key):
        raise ManifestError(
            f"{path} is the graph of phase {found[0]!r} (export key {str(found[1])[:16]}...), but the manifest "
            f"lists it for phase {phase.name!r} (export key {phase.export_key[:16]}...): rebuild with "
            f"`atedm-compile build`")


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


# -- what a rebuild may reuse ----------------------------------------------------------------


def reusable(previous: Manifest | None, manifest: Manifest, directory: Path) -> tuple[Manifest | None, str | None]:
    """The previous build's manifest when a build of ``manifest`` into ``directory`` may reuse its
    artefacts, else None and why not: other build settings (model, precision, exporter, opset)
    or a missing or altered ``weights.bin`` (every graph refers into it) make everything anew."""
    if previous is None:
        return None, None
    if previous.tools.get("settings") != manifest.tools["settings"]:
        return None, "build settings changed (model, precision, exporter or opset): rebuilding from scratch"
    if previous.weights is not None:
        path = directory / previous.weights.file
        if not path.is_file() or sha256_file(path) != previous.weights.sha256:
            return None, f"{WEIGHTS} is missing or altered: rebuilding every phase"
    return previous, None


def carry_over(entry: PhaseEntry, previous: Manifest | None) -> PhaseEntry:
    """``entry`` with the previous build's artefacts of its phase (graph, lint, engine) where they
    were made under the same export key; whether their files are still intact is the build
    steps' check."""
    old = next((p for p in previous.phases if p.name == entry.name), None) if previous else None
    if old is not None and old.export_key == entry.export_key:
        entry.onnx, entry.lint, entry.engine, entry.engine_key = old.onnx, old.lint, old.engine, old.engine_key
        if old.onnx is not None:
            entry.inputs = old.inputs  # the inputs its graph takes (``used_inputs``)
    return entry


def dropped_artefacts(previous: Manifest | None, phases: list[PhaseEntry]) -> list[str]:
    """Files of the previous build's phases that none of ``phases`` carries over: those of phases
    the new schedule no longer has, of phases exported again, and, where the build settings (the
    model...) changed, every one."""
    if previous is None:
        return []
    kept = {artefact.file for p in phases for artefact in (p.onnx, p.engine) if artefact is not None}
    return [artefact.file for old in previous.phases for artefact in (old.onnx, old.engine)
            if artefact is not None and artefact.file not in kept]


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
    "check_meaning",
    "export_key",
    "carry_over",
    "manifest_schedule",
    "phase_graphs",
    "step_io_specs",
    "dropped_artefacts",
    "io_specs",
    "read_manifest",
    "reusable",
    "verify_artefacts",
]
