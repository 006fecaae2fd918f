"""Quality at matched FLOPs on a trained model (``tiny-shapes``, or ``--model`` another folder
such as ``tiny-shapes-xl``): AT-EDM against its ``delta`` recovery, direct copy, ToMe and random
pruning, side by side in one run.

Budgets. The paper's budgets are SD-XL figures: 2.9, 3.6, 4.1 and 4.5 TMACs per pruned step of
6.7 (43%, 54%, 61%, 67%). A tiny model cannot reach those shares: its transformer blocks hold
less of its MACs than SD-XL's, and the first layer of each block is never pruned. So each budget
is carried over as the keep ratio that gives SD-XL's all-pruned phase that cost (the paper's 4.1
is keep 0.37), counted here on the SD-XL config on the meta device. Every method then runs the
DSAP schedule (``atedm`` preset: the first 30% of steps leave F-L unpruned) on the tiny model.
AT-EDM (the paper's: G-WPR, similarity copy by attention) runs at that keep ratio; its
DSAP-average MACs *with its own work counted in* (G-WPR, recovery) are the budget of every other
method, with theirs counted in too (key similarities, weighted updates, ToMe's matching, merging
and unmerging). Methods that prune the same tokens (the recoveries, random) run at the same keep
ratio where their own work fits the budget and at the largest keep ratio that fits otherwise
(``default, at ToMe's MACs``: at the largest that costs no more than ToMe does, by name);
ToMe and AT-EDM-dagger (``atedm-dagger``: level 2 never pruned) at the largest keep ratio (ToMe:
1 - merge ratio) that fits (bisection).

Methods: ``--methods`` (default: AT-EDM, delta by key cosine on G-WPR's top-k, the same with the
best token of every 3 x 3 patch kept first and the rest by score, the package's
``DEFAULT_PRUNING`` (the rest the least like the patch winners, merge-delta) on the paper's one
keep ratio and, the default, on the ``atedm-level2`` schedule (level 2 keeps more), the same with
``layer-delta``, direct copy, ToMe, random); the other delta variants (2 x 2 patches, attention similarity, soft),
the zeros / interpolation recoveries and AT-EDM-dagger by name.

Metrics, over ``--prompts`` held-out captions, one fixed seed per prompt, the same noise for
every method:
- PSNR and SSIM against the full model's image from the same noise (fidelity);
- the detector's colour / shape / position / all-three accuracy against the caption (alignment,
  the CLIP-score analogue);
- Frechet distance of a small classifier's features (``atedm_compile.shapes.measures``, trained on 64 px
  renders; larger images are area-averaged to 64 px, which it reads as well: held-out accuracy
  1.00 on 128 px renders) of the samples against the rendered images of the same captions (the
  FID analogue; lower is better);
- where the pruning lands: the share of the kept tokens' area that the object covers (object
  mask: the detector's, on the method's own image; the conditional half of the CFG batch; every
  pruned block of every step) next to the object's share of all tokens. Their ratio is 1 for a
  choice blind to the object.

Prints one table, writes ``results.json`` and a figure (full model, AT-EDM with its kept tokens,
the best delta variant and ToMe, for a few prompts) into ``--out``. The folder keeps the solved
budgets, the classifier and every method's samples (keyed by the model's weights and the
settings): a rerun, an interrupted run or one with more methods samples only what is missing.

    python benchmarks/quality.py                       # tiny-shapes, 256 prompts, 4 budgets
    python benchmarks/quality.py --model atedm_compile/weights/tiny-shapes-xl --prompts 32 --out out/quality-xl
    python benchmarks/quality.py --prompts 16 --budgets 4.1 --jobs 1    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile.shapes import measures, synthetic  # noqa: E402
from atedm_compile.config import DEFAULT_PRUNING, PAPER_PRUNING, PruningConfig  # noqa: E402
from atedm_compile.evaluate.plan import PLANNER_VERSION, Method, plan_budgets  # noqa: E402
from atedm_compile.files import sha256_file, sha256_json, write_atomically  # noqa: E402
from atedm_compile.flops import solve_keep_ratio  # noqa: E402
from atedm_compile.models import TINY_SHAPES, build_unet, load_trained_pipeline, read_config, resolve_model  # noqa: E402
from atedm_compile.passes import ToMeConfig  # noqa: E402

SDXL_FULL_TMACS = 6.7  # the paper's label of the full model; shares below use our own count
BUDGETS = (2.9, 3.6, 4.1, 4.5)
# The default until 2026-12-06 (merge-delta since: docs/quality.md, "The aggressive budget").
DELTA_DEFAULT = PruningConfig(recovery="delta", similarity="key-cosine", cell=3, fill="distinct")
# DEFAULT_PRUNING on the atedm-level2 schedule (level 2 keeps more), the best measured (docs/quality.md).
DELTA = "default: merge-delta, atedm-level2"
MERGE_UNIFORM = "merge-delta, cell 3, distinct"  # the same on the paper's schedule (one keep ratio)


def _method(name: str, preset: str, config, keep: str = "budget", capped_by: str | None = None) -> Method:
    # "At ToMe's MACs" means ToMe's, above the budget too where ToMe cannot reach it (2.9).
    return Method(name, preset, config, keep, capped_by, above_budget=capped_by is not None)


# The methods, in the package planner's terms (evaluate.plan.Method): keep "budget" = the budget's
# own keep ratio unless that costs more than AT-EDM with the method's own work counted in, "matched"
# = the largest keep ratio that fits; capped_by: at most that method's MACs too.
METHODS = {
    "AT-EDM": _method("AT-EDM", "atedm", PAPER_PRUNING),  # the paper's: similarity copy by attention
    "delta, attention": _method("delta, attention", "atedm", PruningConfig(recovery="delta")),
    "delta, key-cosine": _method("delta, key-cosine", "atedm", PruningConfig(recovery="delta", similarity="key-cosine")),
    "soft delta, key-cosine": _method("soft delta, key-cosine", "atedm",
                                      PruningConfig(recovery="delta", similarity="key-cosine", neighbours=4)),
    "delta, cell 3, by score": _method("delta, cell 3, by score", "atedm",
                                       PruningConfig(recovery="delta", similarity="key-cosine", cell=3)),
    DELTA: _method(DELTA, "atedm-level2", DEFAULT_PRUNING),
    "default, at ToMe's MACs": _method("default, at ToMe's MACs", "atedm-level2", DEFAULT_PRUNING, capped_by="ToMe"),
    MERGE_UNIFORM: _method(MERGE_UNIFORM, "atedm", DEFAULT_PRUNING),
    "merge-delta, uniform, at ToMe's MACs": _method("merge-delta, uniform, at ToMe's MACs", "atedm", DEFAULT_PRUNING,
                                                    capped_by="ToMe"),
    "delta, soft 2, at ToMe's MACs": _method("delta, soft 2, at ToMe's MACs", "atedm",
                                             dataclasses.replace(DELTA_DEFAULT, neighbours=2), capped_by="ToMe"),
    "delta, soft 4, at ToMe's MACs": _method("delta, soft 4, at ToMe's MACs", "atedm",
                                             dataclasses.replace(DELTA_DEFAULT, neighbours=4), capped_by="ToMe"),
    "layer-delta, distinct, at ToMe's MACs": _method("layer-delta, distinct, at ToMe's MACs", "atedm",
                                                     PruningConfig(recovery="layer-delta", cell=3, fill="distinct"),
                                                     capped_by="ToMe"),
    "default, before-ff, at ToMe's MACs": _method("default, before-ff, at ToMe's MACs", "atedm",
                                                  dataclasses.replace(DEFAULT_PRUNING, prune_point="before-ff"),
                                                  capped_by="ToMe"),
    "delta, cell 3, distinct": _method("delta, cell 3, distinct", "atedm", DELTA_DEFAULT),
    "delta, distinct, at ToMe's MACs": _method("delta, distinct, at ToMe's MACs", "atedm", DELTA_DEFAULT,
                                               capped_by="ToMe"),
    "delta, cell 2, distinct": _method("delta, cell 2, distinct", "atedm",
                                       PruningConfig(recovery="delta", similarity="key-cosine", cell=2, fill="distinct")),
    "layer-delta, cell 3, distinct": _method("layer-delta, cell 3, distinct", "atedm",
                                             PruningConfig(recovery="layer-delta", cell=3, fill="distinct")),
    "direct-copy recovery": _method("direct-copy recovery", "atedm", PruningConfig(recovery="direct-copy")),
    "ToMe": _method("ToMe", "atedm", ToMeConfig(), "matched"),
    "random": _method("random", "atedm", PruningConfig(scorer="random")),
    "zeros recovery": _method("zeros recovery", "atedm", PruningConfig(recovery="zeros")),
    "interpolation recovery": _method("interpolation recovery", "atedm", PruningConfig(recovery="interpolation")),
    "AT-EDM-dagger": _method("AT-EDM-dagger", "atedm-dagger", PAPER_PRUNING, "matched"),
}
DEFAULT_METHODS = ("AT-EDM", "delta, key-cosine", "delta, cell 3, by score", MERGE_UNIFORM, DELTA,
                   "layer-delta, cell 3, distinct",
                   "direct-copy recovery", "ToMe", "random")


# -- budgets -----------------------------------------------------------------------------------

def sdxl_keep_ratios(budgets, cache: Path) -> dict[float, dict]:
    """Per budget, the keep ratio whose all-pruned SD-XL phase costs that many TMACs (1024 px,
    CFG pair), and that cost. Counting SD-XL takes a few seconds a time: the answers are kept in
    ``cache`` and reused."""
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [b for b in budgets if str(b) not in saved]
    if missing:
        sdxl = build_unet("sdxl-base", device="meta")
        for budget in missing:
            keep, report = solve_keep_ratio(sdxl, budget, preset="uniform", num_steps=1, tolerance=1e-3)
            saved[str(budget)] = {"keep_ratio": keep, "pruned_tmacs": report.average_tmacs,
                                  "full_tmacs": report.full_tmacs}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, json.dumps(saved, indent=1).encode())
    return {b: saved[str(b)] for b in budgets}


def budget_plan(budgets, steps: int, image_size: int, vae_factor: int, model_dir: Path, cache: Path,
                methods=DEFAULT_METHODS, known: list[dict] = ()) -> list[dict]:
    """Per budget: SD-XL's keep ratio and, per method, the keep ratio it runs at on the tiny model
    and its DSAP-average cost and share of the full model's MACs, without and with the method's own
    work (scoring, recovery, ToMe's matching and merging).

    The package's planner does it (``evaluate.plan.plan_budgets``, as ``atedm-compile evaluate``
    plans), with SD-XL's keep ratio as the budget: AT-EDM runs at it, and its MACs with its own work
    counted in are the budget every other method must meet (see ``Method`` for the keep rules).
    Methods that ``known`` (an earlier plan for the same U-Net and steps) has for a budget, with the
    same config, are taken from it; the others are solved (with the methods that cap them)."""
    sdxl = sdxl_keep_ratios(budgets, cache)

    @functools.cache
    def model():  # built only where something is to be solved
        return build_unet(read_config(model_dir)["unet"], device="meta")

    earlier = {entry["budget"]: entry for entry in known}
    plan = []
    for budget in budgets:
        keep = sdxl[budget]["keep_ratio"]
        before = earlier.get(budget, {"methods": {}})
        reuse = {m: c for m, c in before["methods"].items() if m in methods and c["config"] == repr(METHODS[m])}
        missing = [m for m in methods if m not in reuse]
        if not missing:
            plan.append({**before, "methods": {m: reuse[m] for m in methods}})
            continue
        needed = set(missing) | {METHODS[m].capped_by for m in missing if METHODS[m].capped_by}
        solved = plan_budgets(model(), [m for m in methods if m in needed], keep_ratios=[keep], steps=steps,
                              height=image_size, width=image_size, vae_factor=vae_factor, table=METHODS)
        found = solved["budgets"][0]["methods"]
        plan.append({"budget": budget, "sdxl_keep_ratio": keep, "sdxl_pruned_tmacs": sdxl[budget]["pruned_tmacs"],
                     "sdxl_full_tmacs": sdxl[budget]["full_tmacs"], "full_tmacs": solved["full_tmacs"],
                     "methods": {m: reuse[m] if m in reuse else {**found[m], "config": repr(METHODS[m])}
                                 for m in methods}})
    return plan


# -- sampling (in worker processes) ------------------------------------------------------------

_PIPE = None


def _init_worker(model_dir: str) -> None:
    global _PIPE
    torch.set_num_threads(1)
    _PIPE = load_trained_pipeline(model_dir)


def _grids(runner, latent: int) -> dict[str, tuple[int, int]]:
    sides = {b.name: latent // 2 ** (b.level - 1) for b in runner.blocks}
    return {name: (side, side) for name, side in sides.items()}


def sample_method(task: dict) -> dict:
    """Images of every prompt under one method and budget, and where its kept tokens landed."""
    pipe, started = _PIPE, time.process_time()
    prompts, seeds, steps = task["prompts"], task["seeds"], task["steps"]
    method, keep = task["method"], task["keep_ratio"]
    size, latent = task["image_size"], task["image_size"] // task["vae_factor"]
    runner = None
    if method != "full":
        runner = ac.apply(pipe, METHODS[method].preset, METHODS[method].config, keep_ratio=keep)
    images, kept_share, area_share, kept_maps = [], [], [], []
    track = runner is not None and not isinstance(runner.config, ToMeConfig)
    try:
        for start in range(0, len(prompts), task["batch"]):
            batch = prompts[start:start + task["batch"]]
            steps_kept: list[dict[str, np.ndarray]] = []
            with (runner.capture_kept_tokens() if track else contextlib.nullcontext({})) as captured:
                def on_step_end(pipeline, step, timestep, kwargs):
                    if captured:
                        # The conditional half of the CFG batch (diffusers puts it second).
                        steps_kept.append({name: index[len(batch):].numpy() for name, index in captured.items()})
                        captured.clear()
                    return kwargs

                out = pipe(batch, height=size, width=size, num_inference_steps=steps, guidance_scale=task["guidance"],
                           generator=[torch.Generator().manual_seed(s) for s in seeds[start:start + len(batch)]],
                           output_type="np", callback_on_step_end=on_step_end)
            batch_images = (out.images * 255).round().astype(np.uint8)
            images.append(batch_images)
            if track:
                grids = _grids(runner, latent)
                finest = max(grids.values())
                for i, image in enumerate(batch_images):
                    found = synthetic.detect(image)
                    frequency = np.zeros(finest, np.float64)
                    count = 0
                    if found is not None:
                        coverage = {grid: measures.token_coverage(found.mask, grid) for grid in set(grids.values())}
                        shares, areas = [], []
                        for step in steps_kept:
                            for name, index in step.items():
                                shares.append(measures.kept_share(index[i], coverage[grids[name]]))
                                areas.append(float(coverage[grids[name]].mean()))
                        kept_share.append(float(np.mean(shares)))
                        area_share.append(float(np.mean(areas)))
                    for step in steps_kept:  # kept frequency on the finest grid, for the figure
                        for name, index in step.items():
                            if grids[name] == frequency.shape:
                                flat = np.zeros(frequency.size)
                                flat[index[i]] = 1
                                frequency += flat.reshape(frequency.shape)
                                count += 1
                    if start + i < task["figure_prompts"]:
                        kept_maps.append(frequency / max(count, 1))
    finally:
        if runner is not None:
            ac.remove(pipe)
    return {"method": method, "budget": task["budget"], "images": np.concatenate(images),
            "kept_share": kept_share, "area_share": area_share, "kept_maps": kept_maps,
            "cpu_seconds": time.process_time() - started}


# -- what a run keeps in its output folder ------------------------------------------------------

def task_key(task: dict, model_sha256: str) -> str:
    """A sampling task's identity: the model's weights, the method (its full config) and every
    setting that changes its images."""
    method = task["method"]
    preset, config = (METHODS[method].preset, METHODS[method].config) if method != "full" else ("none", None)
    keys = ("prompts", "seeds", "steps", "guidance", "batch", "image_size", "keep_ratio", "figure_prompts")
    return sha256_json({"model": model_sha256, "preset": preset, "config": repr(config),
                        **{k: task[k] for k in keys}})


def save_samples(path: Path, result: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=result["images"], kept_share=np.asarray(result["kept_share"], np.float64),
             area_share=np.asarray(result["area_share"], np.float64),
             kept_maps=np.asarray(result["kept_maps"], np.float64), cpu_seconds=result["cpu_seconds"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())


def load_samples(path: Path, task: dict) -> dict | None:
    """A task's saved result, or None where there is none (or it cannot be read: sampled again)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {"method": task["method"], "budget": task["budget"], "images": saved["images"],
                    "kept_share": saved["kept_share"].tolist(), "area_share": saved["area_share"].tolist(),
                    "kept_maps": list(saved["kept_maps"]), "cpu_seconds": float(saved["cpu_seconds"])}
    except (OSError, ValueError, KeyError):
        return None


CLASSIFIER_SIZE = 64


def classifier_view(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, S, S, 3], S a multiple of 64 -> [N, 64, 64, 3] by area averaging: the
    Frechet classifier reads every model's images at 64 px."""
    count, side = images.shape[:2]
    if side % CLASSIFIER_SIZE:
        raise ValueError(f"{side} px images do not average down to the classifier's {CLASSIFIER_SIZE} px")
    factor = side // CLASSIFIER_SIZE
    blocks = images.reshape(count, CLASSIFIER_SIZE, factor, CLASSIFIER_SIZE, factor, 3)
    return blocks.mean(axis=(2, 4)).round().astype(np.uint8)


def feature_classifier(out: Path, image_size: int):
    """The Frechet-distance classifier (64 px), trained once per output folder (a minute) and kept
    in it as safetensors, and its held-out accuracy on renders at ``image_size`` seen through
    ``classifier_view``."""
    from safetensors.torch import load_file, safe_open, save

    path = out / f"classifier-{CLASSIFIER_SIZE}px.safetensors"
    if path.is_file():
        model = measures.ShapeClassifier(size=CLASSIFIER_SIZE)
        model.load_state_dict(load_file(path))
        with safe_open(path, "pt") as saved:
            accuracy = json.loads(saved.metadata()["accuracy"])
        model.eval().requires_grad_(False)
    else:
        model, accuracy = measures.train_classifier(size=CLASSIFIER_SIZE, progress=False)
        write_atomically(path, save(model.state_dict(), metadata={"accuracy": json.dumps(accuracy)}))
    if image_size != CLASSIFIER_SIZE:
        held_out, _, _, scenes = synthetic.make_dataset(500, seed=1, size=image_size)
        accuracy = measures.accuracy(model, classifier_view(held_out), scenes)
    return model, accuracy


# -- metrics, table, figure --------------------------------------------------------------------

def metrics(result: dict, full: np.ndarray, captions, classifier, reference_features) -> dict:
    images = result["images"]
    scores = [synthetic.score(image, caption) for image, caption in zip(images, captions)]
    row = {key: float(np.mean([s[key] for s in scores])) for key in ("colour", "shape", "position")}
    row["all"] = float(np.mean([all(s.values()) for s in scores]))
    if result["method"] != "full":
        psnrs = [synthetic.psnr(a, b) for a, b in zip(images, full)]
        row["psnr"] = float(np.mean([min(p, 100.0) for p in psnrs]))  # identical images: capped at 100 dB
        row["ssim"] = float(np.mean([synthetic.ssim(a, b) for a, b in zip(images, full)]))
    row["frechet"] = synthetic.frechet_distance(measures.features(classifier, classifier_view(images)),
                                                reference_features)
    if result["kept_share"]:
        row["kept_in_object"] = float(np.mean(result["kept_share"]))
        row["object_area"] = float(np.mean(result["area_share"]))
        row["enrichment"] = row["kept_in_object"] / row["object_area"]
    return row


def print_table(rows: list[dict], plan: list[dict]) -> None:
    print("\nBudgets: the paper's SD-XL TMACs per pruned step -> SD-XL keep ratio -> per method, the keep "
          "ratio run on this model (ToMe: 1 - merge ratio) and its DSAP-average share of the full model's MACs, "
          "its own work (scoring, recovery, matching) included")
    methods = list(plan[0]["methods"])
    print(f"{'budget':>6} {'SD-XL keep':>10} " + " ".join(f"{m[:22]:>22}" for m in methods))
    for p in plan:
        cells = [f"{c['keep_ratio']:.3f} / {c['share_with_scoring']:.4f}{' cap' if c['capped'] else ''}"
                 for c in p["methods"].values()]
        print(f"{p['budget']:>6} {p['sdxl_keep_ratio']:>10.4f} " + " ".join(f"{c:>22}" for c in cells))
    header = (f"\n{'budget':>6} {'method':<24} {'MACs':>6} {'PSNR':>6} {'SSIM':>6} {'colour':>6} {'shape':>6} {'pos.':>6} "
              f"{'all':>6} {'Frechet':>8} {'kept in obj':>11} {'obj area':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        cell = lambda key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
        print(f"{r['budget']:>6} {r['method']:<24} {r['macs_share']:>6.3f} {cell('psnr', '6.2f'):>6} {cell('ssim', '6.3f'):>6} "
              f"{r['colour']:>6.3f} {r['shape']:>6.3f} {r['position']:>6.3f} {r['all']:>6.3f} {r['frechet']:>8.2f} "
              f"{cell('kept_in_object', '11.3f'):>11} {cell('object_area', '8.3f'):>8} {cell('enrichment', '6.2f'):>6}")


FIGURE_METHODS = ("AT-EDM", DELTA, "ToMe")


def write_figure(path: Path, captions, results: dict, budgets, count: int, zoom: int = 2) -> None:
    """Rows: prompts. Columns: the full model, then per budget AT-EDM (the paper's copy), its pruned
    tokens darkened (kept frequency over the pruned steps, finest attention level), the best delta
    variant and ToMe, each where the run has it."""
    full = results[("full", None)]["images"]
    columns = [("full model", full[:count], None)]
    for budget in budgets:
        for method in FIGURE_METHODS:
            if (method, budget) not in results:
                continue
            result = results[(method, budget)]
            columns.append((f"{method} {budget}", result["images"][:count], None))
            if method == "AT-EDM":
                columns.append((f"kept {budget}", result["images"][:count], result["kept_maps"]))
    tile, label = full.shape[1] * zoom, 12
    figure = Image.new("RGB", (tile * len(columns), label + count * (tile + label)), "white")
    draw = ImageDraw.Draw(figure)
    for c, (title, images, maps) in enumerate(columns):
        draw.text((c * tile + 2, 0), title, fill="black")
        for r in range(count):
            picture = Image.fromarray(images[r]).resize((tile, tile), Image.Resampling.NEAREST)
            if maps is not None:
                weight = Image.fromarray((maps[r] * 255).astype(np.uint8), "L").resize((tile, tile), Image.Resampling.NEAREST)
                dark = Image.blend(picture, Image.new("RGB", picture.size, "black"), 0.75)
                picture = Image.composite(picture, dark, weight)
            top = label + r * (tile + label)
            if c == 0:
                draw.text((2, top), captions[r], fill="black")
            figure.paste(picture, (c * tile, top + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TINY_SHAPES), help="trained model folder")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=2024, help="seed of the held-out captions and of the noise")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS),
                        help=f"default: {'; '.join(DEFAULT_METHODS)}")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    parser.add_argument("--figure-prompts", type=int, default=6)
    parser.add_argument("--figure-budgets", type=float, nargs="+", default=[4.1, 2.9])
    parser.add_argument("--out", default="out/quality",
                        help="output folder; a run keeps its budgets, classifier and samples there and reuses them")
    args = parser.parse_args()
    for budget in args.budgets:
        if not 0 < budget < SDXL_FULL_TMACS:
            raise SystemExit(f"budget {budget} is not in (0, {SDXL_FULL_TMACS}) SD-XL TMACs")
    if args.prompts < 2:
        raise SystemExit(f"--prompts {args.prompts}: need at least 2 for a Frechet distance")
    for name in ("steps", "batch", "jobs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} {getattr(args, name)}: must be 1 or more")
    model = Path(args.model)
    if not (model / "config.json").is_file() or not (model / "model.safetensors").is_file():
        raise SystemExit(f"--model {args.model}: not a trained model folder (config.json and model.safetensors)")
    if "AT-EDM" not in args.methods:
        args.methods.insert(0, "AT-EDM")  # every other method's budget is AT-EDM's cost
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    config = read_config(model)
    image_size = config["image_size"]
    vae_factor = resolve_model(str(model)).vae_factor
    # Solving the budgets counts FLOPs a few dozen times (minutes): reuse what an earlier plan for the
    # same U-Net, size and steps solved, and solve only the budgets and methods it lacks.
    key = {"steps": args.steps, "unet": config["unet"], "image_size": image_size, "planner": PLANNER_VERSION}
    saved = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else {}
    known = saved["plan"] if saved.get("key") == key else []
    plan = budget_plan(args.budgets, args.steps, image_size, vae_factor, model, out / "sdxl-keep.json",
                       args.methods, known)
    kept = {entry["budget"]: entry for entry in known}
    for entry in plan:  # what the earlier plan solved for other methods stays in it
        entry = {**entry, "methods": {**kept.get(entry["budget"], {}).get("methods", {}), **entry["methods"]}}
        kept[entry["budget"]] = entry
    write_atomically(out / "plan.json", json.dumps({"key": key, "plan": list(kept.values())}, indent=1).encode())
    print(f"budgets ready in {time.time() - started:.0f} s")

    rendered, _, captions, _ = synthetic.make_dataset(args.prompts, seed=args.seed, size=image_size)
    seeds = [args.seed + i for i in range(args.prompts)]
    common = dict(prompts=captions, seeds=seeds, steps=args.steps, guidance=args.guidance, batch=args.batch,
                  image_size=image_size, vae_factor=vae_factor, figure_prompts=args.figure_prompts)
    # One task per distinct (method, keep ratio): a capped method runs at the same ratio for several budgets.
    wanted = [("full", None, 1.0)] + [(m, p["budget"], p["methods"][m]["keep_ratio"]) for p in plan for m in args.methods]
    tasks = {}
    for method, budget, keep in wanted:
        tasks.setdefault((method, keep), dict(common, method=method, budget=budget, keep_ratio=keep))
    # Samples are kept per task, keyed by the model's weights and everything that changes them: an
    # interrupted run, or one with more methods, samples only what is missing.
    weights = sha256_json([sha256_file(model / "config.json"), sha256_file(model / "model.safetensors")])
    paths = {key: out / "samples" / f"{task_key(task, weights)[:24]}.npz" for key, task in tasks.items()}
    done = {key: found for key in tasks if (found := load_samples(paths[key], tasks[key])) is not None}
    if done:
        print(f"samples: reusing {len(done)} of {len(tasks)} tasks from {out / 'samples'}")

    from tqdm import tqdm

    # Spawned, not forked: a forked torch can hang in its thread pools.
    context = multiprocessing.get_context("spawn")
    missing = [key for key in tasks if key not in done]
    with ProcessPoolExecutor(min(args.jobs, max(1, len(missing))), context, initializer=_init_worker,
                             initargs=(str(model),)) if missing else contextlib.nullcontext() as pool:
        futures = {pool.submit(sample_method, tasks[key]): key for key in missing}
        classifier, accuracy = feature_classifier(out, image_size)
        print(f"classifier: held-out accuracy {accuracy}")
        reference = measures.features(classifier, classifier_view(rendered))
        for future in tqdm(as_completed(futures), total=len(futures), desc="methods x budgets"):
            key = futures[future]
            done[key] = future.result()
            save_samples(paths[key], done[key])
    results = {(method, budget): done[(method, keep)] for method, budget, keep in wanted}
    shares = {(m, p["budget"]): p["methods"][m]["share_with_scoring"] for p in plan for m in args.methods}

    full = results[("full", None)]["images"]
    rows = []
    measured = {key: metrics(result, full, captions, classifier, reference) for key, result in done.items()}
    for method, budget, keep in wanted:
        rows.append({"method": method, "budget": budget if budget is not None else "full",
                     "macs_share": shares.get((method, budget), 1.0),
                     "cpu_seconds": round(done[(method, keep)]["cpu_seconds"], 1), **measured[(method, keep)]})
    print_table(rows, plan)
    figure_budgets = [b for b in args.figure_budgets if ("AT-EDM", b) in results]
    if figure_budgets:
        figure = out / "quality.png"
        write_figure(figure, captions, results, figure_budgets, min(args.figure_prompts, args.prompts))
        print(f"wrote {figure}")
    record = {"settings": {k: v for k, v in vars(args).items()}, "model_weights_sha256": weights,
              "model_training": config.get("training"), "classifier_accuracy": accuracy,
              "plan": plan, "rows": rows, "seconds": round(time.time() - started)}
    text = json.dumps(record, indent=1, default=lambda v: None if isinstance(v, float) and math.isinf(v) else v)
    write_atomically(out / "results.json", text.encode())
    print(f"wrote {out / 'results.json'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
