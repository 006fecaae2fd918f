"""``atedm-compile check DIR``: everything that can be verified about a build, with or without TensorRT."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .lint import LintIssue, lint_file
from .manifest import read_manifest, verify_artefacts


@dataclass
class PhaseCheck:
    name: str
    issues: list[LintIssue] = field(default_factory=list)
    tensorrt: str = "not run"  # "matches", "differs", or "skipped: <reason>"


@dataclass
class CheckReport:
    directory: Path
    phases: list[PhaseCheck]

    @property
    def ok(self) -> bool:
        return all(not p.issues and p.tensorrt != "differs" for p in self.phases)


def check(directory: str | Path, compare_tensorrt: bool = True, log: Callable[[str], None] = print) -> CheckReport:
    """Check a build directory: manifest format and artefact hashes (ManifestError if wrong), then per
    phase the ONNX checker, the TensorRT-compatibility lint and, where TensorRT, polygraphy and a GPU
    are present and the build has engines, ONNX Runtime vs TensorRT outputs (fp16 tolerances for
    fp16 builds)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_artefacts(directory, manifest)
    log(f"{directory}: manifest version {manifest.format_version}, {len(manifest.phases)} phases, artefact hashes ok")
    reason = None
    if compare_tensorrt:
        from .tensorrt import tensorrt_missing_reason

        reason = tensorrt_missing_reason()
        if reason is None and manifest.backend != "tensorrt":
            reason = "the build has no TensorRT engines (built with --backend onnxruntime)"
    phases = []
    for entry in manifest.phases:
        result = PhaseCheck(entry.name, lint_file(directory / entry.onnx.file))
        if not compare_tensorrt:
            result.tensorrt = "skipped: not asked for"
        elif reason:
            result.tensorrt = f"skipped: {reason}"
        else:
            from .tensorrt import compare_with_onnxruntime

            same = compare_with_onnxruntime(directory / entry.onnx.file, directory / entry.engine.file, entry.inputs,
                                            manifest.precision)
            result.tensorrt = "matches" if same else "differs"
        verdict = "ok" if not result.issues else f"{len(result.issues)} issues"
        role = f"{entry.role} " if entry.role else ""
        log(f"  {entry.name} ({role}steps {entry.start}-{entry.stop - 1}): ONNX checker ok, lint {verdict}; "
            f"TensorRT vs ONNX Runtime: {result.tensorrt}")
        for issue in result.issues:
            log(f"    {issue}")
        phases.append(result)
    return CheckReport(directory, phases)
