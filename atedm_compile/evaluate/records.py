"""What an evaluation's output folder records (settings, captions, the solved plan, each run's
``run.json``) and the checks that a rerun in it has the same settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path


from ..files import write_atomically
from .captions import Caption
from .plan import METHODS, PLANNER_VERSION, plan_budgets
from .config import EvaluateConfig, _runs


def _differs(path: Path, wanted: dict, what: str) -> bool:
    """ValueError where ``path`` holds JSON other than ``wanted``; True where it is not there yet."""
    if not path.is_file():
        return True
    there = json.loads(path.read_text())
    differ = sorted(k for k in set(there) | set(wanted) if there.get(k) != wanted.get(k))
    if differ:
        was = "; ".join(f"{k} {there.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
        raise ValueError(f"{path.parent} holds {what} made with other settings ({was}); "
                         f"use another --out or the same settings")
    return False


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def _check_same(path: Path, wanted: dict, what: str) -> None:
    """Write ``wanted`` to ``path`` as JSON, or check that what is there says the same."""
    if _differs(path, wanted, what):
        _write_json(path, wanted)


def _caption_records(captions: list[Caption], seed: int) -> list[dict]:
    return [{"index": i, "caption": c.text, "seed": seed + i, "image_id": c.image_id, "file_name": c.file_name}
            for i, c in enumerate(captions)]


def _plan_key(config: EvaluateConfig, unet_config: dict, size: dict) -> dict:
    # diffusers' private config keys are bookkeeping, and _use_default_values is a list in set
    # order, which changes with Python's hash seed: left in, every new process solved again.
    unet = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    # Each method by what it is (preset, config, keep rule), not its name: a method redefined under
    # the same name (``default`` moved to atedm-level2) is solved again.
    methods = {name: repr(METHODS.get(name)) for name in config.methods}
    key = {"planner": PLANNER_VERSION, "unet": unet, "methods": methods, "budgets": list(config.budgets),
           "keep_ratios": list(config.keep_ratios), "steps": config.steps, **size, "tolerance": config.budget_tolerance}
    return json.loads(json.dumps(key, default=str))


def _check_rows_kept(out: Path, runs: list[str], images: int) -> None:
    """ValueError where ``results.json`` holds rows (or more images) that this run would drop."""
    path = out / "results.json"
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    had = record["settings"]["images"]
    dropped = [row["run"] for row in record["rows"] if row["run"] not in runs]
    if dropped or images < had:
        what = f"the rows {dropped}" if dropped else "its rows"
        raise ValueError(f"{path} holds {what} of {had} images, which this run ({images} images) would drop; rerun "
                         f"with every method, budget and guidance scale it holds and --images {had} or more (what "
                         f"is made is reused), or use another --out")


def _prepare(out: Path, settings: dict, captions: list[dict], config: EvaluateConfig, unet_config: dict, size: dict) -> dict:
    """Rank 0: check the settings and captions of ``out``, make (or reuse) the plan, then record them.

    Nothing is written before every check has passed, the plan's included (a budget it cannot reach)."""
    if not any((out / "images").glob("*/*.png")):
        # An earlier run stopped before its first image: its records hold nothing to keep.
        for record in [out / "settings.json", out / "captions.json", *(out / "images").glob("*/run.json")]:
            record.unlink(missing_ok=True)
    new_settings = _differs(out / "settings.json", settings, "images")
    saved = json.loads((out / "captions.json").read_text()) if (out / "captions.json").is_file() else []
    for old, new in zip(saved, captions):
        if old != new:
            raise ValueError(f"{out} holds images of other captions (caption {new['index']}: {old['caption']!r} there, "
                             f"{new['caption']!r} now); use another --out")
    key = _plan_key(config, unet_config, size)
    cached = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else {}
    if cached.get("key") == key:
        plan = cached["plan"]
    else:
        from ..models import build_unet

        print("solving the budgets' keep ratios (FLOPs on the meta device)...", file=sys.stderr)
        plan = plan_budgets(build_unet(unet_config, device="meta"), config.methods, config.budgets, config.keep_ratios,
                            config.steps, tolerance=config.budget_tolerance, **size)
    runs = _runs(config, plan)
    for run in runs:
        _differs(out / "images" / run.name / "run.json", run.record(), "images")
    _check_rows_kept(out, [run.name for run in runs], len(captions))
    if new_settings:
        _write_json(out / "settings.json", settings)
    if len(captions) > len(saved):
        _write_json(out / "captions.json", captions)
    if cached.get("key") != key:
        _write_json(out / "plan.json", {"key": key, "plan": plan})
    for run in runs:
        _check_same(out / "images" / run.name / "run.json", run.record(), "images")
    return plan

