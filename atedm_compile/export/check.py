"""``atedm-compile check DIR``: everything that can be verified about a build, with or without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .backends import get_backend
from .lint import LintIssue, lint_file
from .manifest import read_manifest, verify_artefacts


@dataclass
class PhaseCheck:
    name: str
    issues: list[LintIssue] = field(default_factory=list)
    engine: str = "not run"  # the backend's own artefact against ONNX Runtime: "matches", "differs", "skipped: <reason>"


@dataclass
class CheckReport:
    directory: Path
    phases: list[PhaseCheck]

    @property
    def ok(self) -> bool:
        return all(not p.issues and p.engine != "differs" for p in self.phases)


def check(directory: str | Path, compare_engines: bool = True, log: Callable[[str], None] = print) -> CheckReport:
    """Check a build directory: manifest format and artefact hashes (ManifestError if wrong), then per
    phase the ONNX checker, the TensorRT-compatibility lint and, where the build's backend made an
    artefact of its own per phase (a TensorRT engine) and can run here, that artefact against ONNX
    Runtime (``Backend.compare``; fp16 tolerances for fp16 builds)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_artefacts(directory, manifest)
    log(f"{directory}: manifest version {manifest.format_version}, {len(manifest.phases)} phases, artefact hashes ok")
    backend = get_backend(manifest.backend)
    engines = any(backend.artefacts(entry) for entry in manifest.phases)
    if not compare_engines:
        reason = "not asked for"
    elif not engines:
        reason = f"the build has no engines of its own to compare (built with --backend {manifest.backend})"
    else:
        reason = backend.missing()
    phases = []
    for entry in manifest.phases:
        result = PhaseCheck(entry.name, lint_file(directory / entry.onnx.file))
        if reason:
            result.engine = f"skipped: {reason}"
        else:
            result.engine = "matches" if backend.compare(directory, entry, manifest.precision) else "differs"
        verdict = "ok" if not result.issues else f"{len(result.issues)} issues"
        role = f"{entry.role} " if entry.role else ""
        log(f"  {entry.name} ({role}steps {entry.start}-{entry.stop - 1}): ONNX checker ok, lint {verdict}; "
            f"{backend.title if engines else 'engine'} vs ONNX Runtime: {result.engine}")
        for issue in result.issues:
            log(f"    {issue}")
        phases.append(result)
    return CheckReport(directory, phases)
