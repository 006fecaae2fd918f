"""What a manifest must mean besides its form: its phases are exactly those its schedule gives,
its shapes follow from its batch and size, each export key from its recorded settings, and every
artefact and weight lies inside the build."""

from __future__ import annotations

import math
from pathlib import Path

from .contract import MANIFEST, PRECISIONS, WEIGHTS, ManifestError, manifest_schedule, phase_graphs, step_io_specs
from .keys import export_key, sha256_json


def check_meaning(manifest, path: Path | str = MANIFEST) -> None:
    """ManifestError unless the manifest agrees with itself: the phases are those its schedule
    gives, the shapes follow from its batch and size, each export key from its settings."""
    import numpy as np

    from ..config import PruningConfig
    from .backends import BACKENDS

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

