"""What a rebuild into a build directory may reuse of the build already there."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from .backends import tool_versions
from .contract import MANIFEST, WEIGHTS, phase_graphs, step_io_specs
from .directory import RAW, raw_export_dir
from .keys import build_settings, export_key, sha256_file, sha256_json
from .manifest import Manifest, ManifestError, PhaseEntry, read_manifest
from .onnxruntime import CPU_CACHE


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


def start_manifest(plan) -> Manifest:
    """The manifest of ``plan``'s build, carrying over what the build already in its directory
    made under the same keys, and that build's files no phase carries over removed."""
    previous = None
    if (plan.directory / MANIFEST).exists():
        try:
            previous = read_manifest(plan.directory)
        except ManifestError as error:
            plan.log(f"previous manifest not reused: {error}")
    config = plan.config
    schedule = {"preset": config.schedule, "num_steps": config.num_steps, "options": config.schedule_options()}
    if config.cache is not None:  # left out without one: those manifests are written as before
        schedule["cache"] = asdict(config.cache)
    manifest = Manifest(
        model={**plan.identity, "config": dict(plan.unet_config)},
        schedule=schedule,
        pruning=asdict(config.pruning), batch=config.batch, height=plan.height, width=plan.width,
        latent=plan.latent, precision=config.precision, backend=config.backend, exporter=config.exporter,
        opset=config.opset, tools=tool_versions(), phases=[], vae_factor=plan.vae_factor,
    )
    manifest.tools["settings"] = sha256_json(build_settings(manifest))
    found = previous
    if plan.waited and found is not None and found.tools.get("settings") != manifest.tools["settings"]:
        # Two builds of other settings raced into this folder: the one that came second does not
        # undo the first's finished work behind its back.
        raise ValueError(f"{plan.directory}: another build, of other settings (model {found.model['name']!r}), "
                         f"finished there while this one waited; refusing to replace it: use another --out, "
                         f"or run this build again to replace it")
    previous, reason = reusable(previous, manifest, plan.directory)
    if reason:
        plan.log(reason)
    if previous is None:
        (plan.directory / WEIGHTS).unlink(missing_ok=True)
    phases = []
    branch = config.cache.branch if config.cache is not None else None
    for name, phase, role in phase_graphs(plan.schedule):
        inputs, outputs = step_io_specs(plan.unet_config, config.batch, *plan.latent, config.precision, role,
                                        branch)
        rules = [list(r) for r in phase.rules]
        key = export_key(manifest, rules, inputs, role)
        phases.append(carry_over(PhaseEntry(name, phase.start, phase.stop, rules, inputs, outputs, key,
                                            role=role), previous))
    dropped = dropped_artefacts(found, phases)
    for file in dropped:
        (plan.directory / file).unlink(missing_ok=True)
    if dropped:  # ONNX Runtime's optimised copies of those graphs, each with a copy of the weights
        shutil.rmtree(plan.directory / CPU_CACHE, ignore_errors=True)
    wanted = {raw_export_dir(plan.directory, entry).name for entry in phases}
    for raw in (plan.directory / RAW).glob("*"):
        if raw.is_dir() and not raw.name.startswith(".") and raw.name not in wanted:
            shutil.rmtree(raw, ignore_errors=True)
    manifest.phases = phases
    manifest.weights = previous.weights if previous else None
    manifest.weights_index = previous.weights_index if previous else {}
    return manifest
