"""Quality per second on a trained model: every method at several settings of its own (ToMe, ToDo,
the DeepCache package, diffusers' cache hooks that apply to a U-Net, our schedules), each a point
of measured CPU speed-up against PSNR and the Frechet analogue, and which to pick at which speed-up.

Sampling: ``--prompts`` captions drawn by the toy kit's caption sampler
(``synthetic.make_dataset(n, seed=--seed)``; the default seed 2222 is used by no other benchmark
here: training draws seed 0, the classifier's held-out set 1, ``quality.py`` 2024), one pipeline
call per caption, noise seed ``--seed`` + the caption's index: the same noise for every method.

Metrics: PSNR against the full model's image from the same noise (mean over captions, identical
images capped at 100 dB); the Frechet analogue of ``benchmarks/quality.py`` (its feature
classifier, trained once and kept in ``--out`` as safetensors) of the samples against the renders
of the same captions; the speed-up: process CPU time of the whole sampling run of all captions
(text encoders, U-Net, VAE) on one thread, the full model and the methods run in turn in rounds;
a method's speed-up is the mean over its ``--repeats`` runs of the full model's time in the same
round over the method's (``paired_speed_up``). Each timed run follows
one untimed caption under the method (our passes build their graphs at their first call).

Everything is kept in ``--out``: each method's images (keyed by the model's weights, the method's
family and settings and the sampling settings) and all its timings; a rerun measures only what is
missing. Prints the table and the per-speed-up statement, writes ``results.json`` and
``front.png``.

    OMP_NUM_THREADS=1 nice -n 5 python3 -m benchmarks.front                       # 16 captions, 30 steps
    OMP_NUM_THREADS=1 python3 -m benchmarks.front --prompts 2 --steps 10 --repeats 1 --out out/front-smoke

To add methods (our schedules), pass them to ``main``:

    from benchmarks import front, peers
    front.main(methods=[*peers.peer_methods(30), peers.ours("AT-EDM k0.5 + DC i2", "atedm", None,
               keep_ratio=0.5, cache=DeepCacheConfig(interval=2))])
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

from atedm_compile.config import DEFAULT_PRUNING, PruningConfig
from atedm_compile.planner import Plan
from atedm_compile.schedule import level2_keep_ratio
from atedm_compile.export.manifest import sha256_file, sha256_json
from atedm_compile.files import write_atomically

from . import peers
from .peers import FULL, Method

SPEED_UPS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
PSNR_CAP = 100.0
NOISE_NOTE = ("The machine is shared (2 cores, other jobs running): CPU times are process times on one thread, "
              "each run divided into the full model's of the same round and the ratios averaged, but cache and "
              "memory contention still move a ratio by up to 10% between rounds.")


# The planner's points (``atedm_compile.planner``): caching alone (DeepCache's rule, our code),
# pruning alone (DSAP) and both, with cheaper pruning where caching already removes most of the
# work, and level 2 spared on the first half of the steps.
OUR_PLANS = (
    Plan(0.37, 0.3), Plan(0.1, 0.3),
    Plan(interval=2), Plan(interval=3), Plan(interval=4), Plan(interval=5),
    Plan(0.7, 0.3, interval=2), Plan(0.5, 0.3, interval=2), Plan(0.37, 0.3, interval=2),
    Plan(0.7, 0.3, interval=3), Plan(0.5, 0.3, interval=3), Plan(0.37, 0.3, interval=3),
    Plan(0.5, 0.3, 0.5, interval=3), Plan(0.7, 0.3, interval=4), Plan(0.5, 0.3, interval=4),
    Plan(0.7, 0.3, interval=5),
)


# The pruning of our points: the patch winners, the distinct fill and the delta recovery (the
# default when the front was first measured); MERGED_PLANS adds the default's merge-delta beside it.
PLAN_PRUNING = PruningConfig(recovery="delta", similarity="key-cosine", cell=3, fill="distinct")


# The same points with the package default's recovery since 2026-12-06 (merge-delta), where pruning
# and caching are stacked.
MERGED_PLANS = tuple(plan for plan in OUR_PLANS if plan.keep_ratio < 1 and plan.interval in (2, 3, 4))
# The atedm-level2 preset's rule (level 2 keeps min(1, 2 sqrt(keep)): docs/quality.md, "Keep ratios
# per level") with merge-delta, alone and stacked on caching, at the low keep ratios it is made for.
LEVEL2_PLANS = tuple(Plan(keep, 0.3, interval=interval, level2_keep=level2_keep_ratio(keep))
                     for keep in (0.2, 0.1, 0.04) for interval in (1, 2, 3, 4)) + (
    Plan(0.1, 0.3, interval=5, level2_keep=level2_keep_ratio(0.1)),)
# Cached steps reading the line through the last two full steps' features (DeepCacheConfig's
# forecast="linear"), alone and with the level-2 rule's pruning.
FORECAST_PLANS = tuple(Plan(interval=interval, forecast="linear") for interval in (2, 3, 4, 5)) + tuple(
    Plan(keep, 0.3, interval=interval, level2_keep=level2_keep_ratio(keep), forecast="linear")
    for keep in (0.2, 0.1) for interval in (2, 3, 4))


def our_methods(steps: int = 30, plans=OUR_PLANS, config: PruningConfig = PLAN_PRUNING,
                merged_plans=MERGED_PLANS + LEVEL2_PLANS + FORECAST_PLANS) -> list[Method]:
    """Our schedules: each planner point as its schedule for ``steps`` steps, pruning by ``config``;
    and ``merged_plans`` with ``DEFAULT_PRUNING`` (merge-delta)."""
    return ([peers.ours(plan.label, plan.schedule(steps), config) for plan in plans]
            + [peers.ours(plan.label + (", merge-delta" if plan.keep_ratio < 1 else ""), plan.schedule(steps),
                          DEFAULT_PRUNING) for plan in merged_plans])


def paired_speed_up(full: dict, method: dict) -> float:
    """The method's speed-up: the mean over its runs of the full model's time in the same round
    divided by the method's (``timings.json`` entries: ``seconds`` and the ``rounds`` they ran in).
    The load of a shared machine moves both runs of a round alike; across rounds it moved the full
    model's time by up to 17% here."""
    for entry in (full, method):
        if len(entry.get("rounds", ())) != len(entry["seconds"]):
            raise ValueError(f"{entry['method']!r}: timings without their rounds (written before rounds were "
                             f"recorded): remove timings.json from --out to time again")
    full_by_round = dict(zip(full["rounds"], full["seconds"]))
    missing = sorted(set(method["rounds"]) - set(full_by_round))
    if missing:
        raise ValueError(f"{method['method']!r} ran in rounds {missing}, where the full model did not run")
    return statistics.fmean(full_by_round[r] / s for s, r in zip(method["seconds"], method["rounds"]))


# -- keys and storage --------------------------------------------------------------------------

def cache_key(weights: str, method: Method, sampling: dict) -> str:
    """What a method's images depend on: the model's weights, the method's family and settings
    (not its display name) and the sampling settings."""
    return sha256_json({"model": weights, "family": method.family, "settings": method.settings, "sampling": sampling})


def load_images(path: Path) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            return saved["images"]
    except (OSError, ValueError, KeyError):
        return None


def save_images(path: Path, images: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())


# -- the front ---------------------------------------------------------------------------------

def envelope(points, higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points (speed-up, quality) no other point beats at once in speed-up and quality,
    ascending in speed-up (their quality then descends)."""
    sign = 1 if higher_is_better else -1
    best, front = -math.inf, []
    for speed, value in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
        if sign * value > best:
            best = sign * value
            front.append((speed, value))
    return front[::-1]


def interpolate(points, speed_up: float, higher_is_better: bool = True, strict: bool = False) -> float | None:
    """A family's quality at ``speed_up``: on the upper envelope of its own points (a point faster
    and better serves any slower speed-up), linear between envelope points; None above the
    family's fastest point. Below its slowest point the envelope's slowest point serves (it is
    faster and at least as good); ``strict``: None there too (only the measured range)."""
    points = [(float(s), float(v)) for s, v in points if v is not None and math.isfinite(v)]
    if not points or speed_up > max(s for s, _ in points):
        return None
    if strict and speed_up < min(s for s, _ in points):
        return None
    front = envelope(points, higher_is_better)
    for (s0, v0), (s1, v1) in itertools.pairwise(front):
        if s0 <= speed_up <= s1:
            return v0 + (v1 - v0) * (speed_up - s0) / (s1 - s0) if s1 > s0 else max(v0, v1)
    # Below the envelope's slowest point (it is faster and better), or on a single point.
    return next(v for s, v in front if s >= speed_up)


def leaders(rows: list[dict], speed_ups=SPEED_UPS, strict: bool = False) -> list[dict]:
    """Per speed-up, each family's interpolated PSNR and Frechet analogue (``interpolate``), the
    best family by each and its lead over the next (None where fewer than two families reach that
    speed-up)."""
    families = sorted({r["family"] for r in rows if r["family"] != "full"})
    out = []
    for speed in speed_ups:
        entry = {"speed_up": speed}
        for metric, higher in (("psnr", True), ("frechet", False)):
            values = {}
            for family in families:
                points = [(r["speed_up"], r[metric]) for r in rows if r["family"] == family]
                value = interpolate(points, speed, higher, strict)
                if value is not None:
                    values[family] = value
            ranked = sorted(values.items(), key=lambda kv: -kv[1] if higher else kv[1])
            entry[metric] = {
                "values": values, "best": ranked[0][0] if ranked else None,
                "runner_up": ranked[1][0] if len(ranked) > 1 else None,
                "lead": abs(ranked[0][1] - ranked[1][1]) if len(ranked) > 1 else None}
        out.append(entry)
    return out


def statement(entry: dict) -> str:
    """One line: which family to pick at this speed-up by PSNR and by the Frechet analogue."""
    parts = []
    for metric, label, unit in (("psnr", "PSNR", " dB"), ("frechet", "Frechet", "")):
        m = entry[metric]
        if m["best"] is None:
            parts.append(f"by {label}: no family reaches it")
        elif m["runner_up"] is None:
            parts.append(f"by {label}: {m['best']} ({m['values'][m['best']]:.2f}{unit}), the only family there")
        else:
            parts.append(f"by {label}: {m['best']} ({m['values'][m['best']]:.2f}{unit}), "
                         f"{m['lead']:.2f}{unit} ahead of {m['runner_up']}")
    return f"at {entry['speed_up']:g}x: " + "; ".join(parts)


def settings_text(row: dict) -> str:
    """A method's own settings, short: peers built on our passes (ToMe, ToDo) without the
    schedule and config they run through."""
    hidden = {"steps", "blocks", "package"} | ({"preset", "config", "keep_ratio"} if row["family"] != "ours" else set())
    return ", ".join(f"{k}={v}" for k, v in row["settings"].items() if k not in hidden)


def print_table(rows: list[dict]) -> None:
    header = f"{'family':<11} {'method':<26} {'speed-up':>8} {'CPU s':>7} {'PSNR':>6} {'Frechet':>8}  settings"
    print(header)
    print("-" * len(header))
    for r in rows:
        psnr = f"{r['psnr']:6.2f}" if r["psnr"] is not None else "     -"
        print(f"{r['family']:<11} {r['method']:<26} {r['speed_up']:>7.2f}x {r['cpu_seconds']:>7.1f} {psnr} "
              f"{r['frechet']:>8.2f}  {settings_text(r)}")


def markdown_table(rows: list[dict]) -> str:
    """The table for docs: family, method, settings, speed-up, CPU seconds, PSNR, Frechet."""
    lines = ["| family | method | settings | speed-up | CPU s | PSNR (dB) | Frechet |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
        lines.append(f"| {r['family']} | {r['method']} | {settings_text(r)} | {r['speed_up']:.2f}x | "
                     f"{r['cpu_seconds']:.1f} | {psnr} | {r['frechet']:.2f} |")
    return "\n".join(lines) + "\n"


MARKERS = "osD^v<>pP*Xh"


def write_figure(path: Path, rows: list[dict], title: str) -> None:
    """Two panels over the measured CPU speed-up: PSNR against the full model, and the Frechet
    analogue (the full model's as a dashed line); one colour and marker per family, every point
    drawn and the family's envelope (the points nothing of its own beats on both) joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    families = sorted({r["family"] for r in rows if r["family"] != "full"})
    colours = plt.get_cmap("tab10")
    for i, family in enumerate(families):
        points = sorted((r["speed_up"], min(r["psnr"], PSNR_CAP), r["frechet"]) for r in rows if r["family"] == family)
        colour, marker = colours(i % 10), MARKERS[i % len(MARKERS)]
        for axis, column, higher in ((axes[0], 1, True), (axes[1], 2, False)):
            axis.scatter([p[0] for p in points], [p[column] for p in points], color=colour, marker=marker, s=22,
                         label=family)
            line = envelope([(p[0], p[column]) for p in points], higher_is_better=higher)
            axis.plot([p[0] for p in line], [p[1] for p in line], color=colour, linewidth=1.2)
    full = next((r for r in rows if r["family"] == "full"), None)
    if full is not None:
        axes[1].axhline(full["frechet"], color="gray", linestyle="--", linewidth=1, label="full model")
    axes[0].set_ylabel("PSNR against the full model (dB, higher is better)")
    axes[1].set_ylabel("Frechet analogue (lower is better)")
    for axis in axes:
        axis.set_xlabel("measured CPU speed-up (one thread)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_atomically(path, buffer.getvalue())


# -- sampling ----------------------------------------------------------------------------------

def sample(pipe, captions, seeds, steps: int, guidance: float, size: int, progress=None) -> np.ndarray:
    images = []
    for caption, seed in zip(captions, seeds):
        out = pipe(caption, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
        images.append((out.images[0] * 255).round().astype(np.uint8))
        if progress is not None:
            progress.update(1)
    return np.stack(images)


def timed_run(pipe, method: Method, captions, seeds, steps, guidance, size, progress) -> tuple[np.ndarray, float]:
    """The images of all captions under ``method`` and the process CPU time they took, after one
    untimed caption (first-call work: graph building, hook set-up)."""
    with method.enable(pipe):
        sample(pipe, captions[:1], seeds[:1], steps, guidance, size)
        started = time.process_time()
        images = sample(pipe, captions, seeds, steps, guidance, size, progress)
        seconds = time.process_time() - started
    return images, seconds


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes-xl", help="a shipped trained model or its folder")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=2222, help="seed of the captions; caption i's noise is seed + i")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest is kept")
    parser.add_argument("--families", nargs="+", help="only these families (and the full model)")
    parser.add_argument("--out", default="out/front")
    args = parser.parse_args(argv)
    if args.prompts < 2:
        parser.error(f"--prompts {args.prompts}: need at least 2 for a Frechet distance")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be 1 or more")
    return args


def main(argv=None, methods: list[Method] | None = None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    from atedm_compile.models import load_pipeline, model_folder
    from atedm_compile.shapes import measures, synthetic

    from .quality import classifier_view, feature_classifier

    methods = list(methods) if methods is not None else peers.peer_methods(args.steps) + our_methods(args.steps)
    if args.families:
        unknown = sorted(set(args.families) - {m.family for m in methods})
        if unknown:
            raise SystemExit(f"--families {' '.join(unknown)}: not among {sorted({m.family for m in methods})}")
        methods = [m for m in methods if m.family in args.families]
    peers.check_unique([FULL, *methods])
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()

    folder = model_folder(args.model)
    if folder is None:
        raise SystemExit(f"--model {args.model}: not a trained model (a shipped name or a folder with config.json)")
    weights = sha256_json([sha256_file(folder / "config.json"), sha256_file(folder / "model.safetensors")])
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rendered, _, captions, _ = synthetic.make_dataset(args.prompts, seed=args.seed, size=size)
    seeds = [args.seed + i for i in range(args.prompts)]
    sampling = {"captions": captions, "seeds": seeds, "steps": args.steps, "guidance": args.guidance, "size": size}

    everything = [FULL, *methods]
    keys = {m.name: cache_key(weights, m, sampling) for m in everything}
    paths = {name: out / "samples" / f"{key[:24]}.npz" for name, key in keys.items()}
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    images = {m.name: found for m in everything if (found := load_images(paths[m.name])) is not None}

    def runs_missing(method):
        seconds = timings.get(keys[method.name], {}).get("seconds", [])
        return max(args.repeats - len(seconds), 0) or (0 if method.name in images else 1)

    # Rounds: the full model, then every method still short of runs; the full model runs in every
    # round that runs anything, so each method's runs sit beside full runs on the same machine state.
    rounds = max((runs_missing(m) for m in methods), default=0)
    rounds = max(rounds, runs_missing(FULL))
    total = sum(min(runs_missing(m), rounds) for m in methods) + rounds
    reused = sum(1 for m in everything if runs_missing(m) == 0)
    print(f"{args.model} ({weights[:12]}), {args.prompts} captions (seed {args.seed}), {args.steps} steps, guidance "
          f"{args.guidance}, {size} px, one thread; {len(methods)} methods, {reused} of {len(everything)} with all "
          f"their {args.repeats} runs already; {total} sampling runs to do")
    nondeterministic = []
    with tqdm(total=total * args.prompts, desc="captions sampled", unit="img") as progress:
        # A round's id goes with every run in it: a method's speed-up is against the full model's
        # runs of the same rounds only, so runs made on another day or under another load stay apart.
        next_round = 1 + max((r for entry in timings.values() for r in entry.get("rounds", [])), default=-1)
        for round_id in range(next_round, next_round + rounds):
            todo = [FULL] + [m for m in methods if runs_missing(m) > 0]
            for method in todo:
                progress.set_postfix_str(method.name)
                result, seconds = timed_run(pipe, method, captions, seeds, args.steps, args.guidance, size, progress)
                if method.name in images:
                    if not np.array_equal(images[method.name], result):
                        nondeterministic.append(method.name)
                else:
                    save_images(paths[method.name], result)
                    images[method.name] = result
                entry = timings.setdefault(keys[method.name], {"method": method.name, "seconds": [], "rounds": []})
                entry["seconds"].append(round(seconds, 3))
                entry["rounds"].append(round_id)
                write_atomically(timings_path, json.dumps(timings, indent=1).encode())

    classifier, accuracy = feature_classifier(out, size)
    reference = measures.features(classifier, classifier_view(rendered))
    full_images = images[FULL.name]
    full_runs = timings[keys[FULL.name]]
    rows = []
    for method in everything:
        seconds = timings[keys[method.name]]["seconds"]
        psnrs = [min(synthetic.psnr(a, b), PSNR_CAP) for a, b in zip(images[method.name], full_images)]
        rows.append({"method": method.name, "family": method.family, "settings": method.settings,
                     "cpu_seconds": min(seconds), "all_seconds": seconds,
                     "speed_up": paired_speed_up(full_runs, timings[keys[method.name]]),
                     "psnr": float(np.mean(psnrs)) if method is not FULL else None,
                     "frechet": synthetic.frechet_distance(
                         measures.features(classifier, classifier_view(images[method.name])), reference)})
    rows.sort(key=lambda r: (r["family"] != "full", r["family"], r["speed_up"]))
    load_after = os.getloadavg()
    print()
    print_table(rows)
    print(f"\n{NOISE_NOTE} Load average (1, 5, 15 min) at the start {tuple(round(x, 2) for x in load_before)}, "
          f"at the end {tuple(round(x, 2) for x in load_after)}. Classifier held-out accuracy {accuracy}.")
    if nondeterministic:
        print(f"warning: a repeat gave other images than the first run for: {', '.join(nondeterministic)}")
    measured = [r for r in rows if r["family"] != "full"]
    lead = leaders(measured)
    print("\nBest family per speed-up (each family on the envelope of its own points, linear between them; a "
          "family's faster and better point serves a slower speed-up; none beyond its fastest point):")
    for entry in lead:
        print("  " + statement(entry))
    title = (f"{args.model}: {args.prompts} captions (seed {args.seed}), {args.steps} steps, guidance {args.guidance}; "
             f"speed-up = CPU time of the full model's run / the method's in the same round, one thread, mean of "
             f"{args.repeats}")
    write_figure(out / "front.png", rows, title)
    record = {"settings": vars(args), "captions": captions, "model_weights_sha256": weights,
              "classifier_accuracy": accuracy, "load_average": {"start": load_before, "end": load_after},
              "note": NOISE_NOTE, "rows": rows, "leaders": lead, "statements": [statement(e) for e in lead],
              "statements_measured_range_only": [statement(e) for e in leaders(measured, strict=True)],
              "nondeterministic": nondeterministic, "seconds": round(time.time() - started)}
    write_atomically(out / "results.json", json.dumps(record, indent=1).encode())
    write_atomically(out / "table.md", markdown_table(rows).encode())
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {out / 'front.png'} ({time.time() - started:.0f} s)")
    return record


if __name__ == "__main__":
    main()
