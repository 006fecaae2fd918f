"""A build as a linear list of named stages (load model -> trace + passes -> per phase: export
ONNX, clean up, check, a backend's own stages -> manifest): each says whether it can be skipped
and why, and what it does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class BuildStage:
    """One named stage of a build (not a sampling step): ``skip()`` returns why it can be skipped (or None),
    ``run()`` does it."""

    name: str
    skip: Callable[[], str | None]
    run: Callable[[], None]


@dataclass
class StageRecord:
    name: str
    ran: bool
    detail: str
    seconds: float


def run_stages(stages: list[BuildStage], log: Callable[[str], None] = print) -> list[StageRecord]:
    """Run the stages in order; each says whether it ran (and how long it took) or why not."""
    from tqdm import tqdm

    records = []
    bar = tqdm(stages, desc="build", unit="stage", leave=False)
    emit = bar.write if log is print else log  # print would tear the bar
    for i, stage in enumerate(bar, 1):
        bar.set_postfix_str(stage.name)
        reason = stage.skip()
        if reason:
            records.append(StageRecord(stage.name, False, reason, 0.0))
            emit(f"[{i}/{len(stages)}] {stage.name}: skipped ({reason})")
            continue
        started = time.perf_counter()
        stage.run()
        seconds = time.perf_counter() - started
        records.append(StageRecord(stage.name, True, "done", seconds))
        emit(f"[{i}/{len(stages)}] {stage.name}: done in {seconds:.1f} s")
    return records
