"""Keep ratios per level at matched MACs: which level's pruning costs the fidelity, and how to split
the kept tokens between the level-2 blocks (two layers, the finest attention) and the others.

Every point is a DSAP schedule (the ``atedm`` preset's phases: the first 30% of steps leave F-L
unpruned) with its own keep ratio per level, pruning by ``DEFAULT_PRUNING``; its MACs are the
schedule average with the method's own work counted in, as a share of the full model's; PSNR is
against the full model's image from the same noise (mean over ``--prompts`` captions drawn by the
toy kit's sampler with ``--seed``, caption i's noise seed + i). Points:

- ``--pairs L2:L3 ...``: fixed keep ratios (1 leaves that level unpruned);
- ``--level2 K ...`` with ``--limit S``: each level-2 keep ratio, the other levels at the largest
  keep ratio whose cost is at most S;
- ``--factors C ...`` with ``--limit S``: level 2 at min(1, C sqrt(keep)) (the ``atedm-level2``
  preset's rule is C = 2), the others at the largest keep that fits.

    OMP_NUM_THREADS=1 python3 -m benchmarks.levels --pairs 0.085:0.085 0.085:1 1:0.085
    OMP_NUM_THREADS=1 python3 -m benchmarks.levels --limit 0.5614 --level2 0.2 0.3 --factors 1.6 2
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile.config import DEFAULT_PRUNING  # noqa: E402
from atedm_compile.flops import count_phases  # noqa: E402
from atedm_compile.models import build_unet, load_trained_pipeline, read_config, resolve_model  # noqa: E402
from atedm_compile.schedule import Phase, Schedule  # noqa: E402
from atedm_compile.shapes import synthetic  # noqa: E402

def schedule(steps: int, level2: float, others: float) -> Schedule:
    """The ``atedm`` preset's phases with level 2 at ``level2`` and every other block at ``others``
    (the level rule after the preset's first, ``*``, so that the prune-less blocks stay unpruned)."""
    base = ac.make_schedule("atedm", steps, keep_ratio=others)
    return Schedule(tuple(Phase(p.name, p.start, p.stop, p.rules[:1] + (("level2", level2),) + p.rules[1:])
                          for p in base.phases), steps, "levels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-shapes-xl", help="a shipped trained model or its folder")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=31, help="seed of the captions (31: the tuning set)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--pairs", nargs="*", default=[], help="level-2:others keep ratios, e.g. 0.3:0.04")
    parser.add_argument("--level2", nargs="*", type=float, default=[], help="level-2 keep ratios (with --limit)")
    parser.add_argument("--factors", nargs="*", type=float, default=[], help="C of min(1, C sqrt(keep)) (with --limit)")
    parser.add_argument("--limit", type=float, help="MACs share the solved points may cost at most")
    args = parser.parse_args()
    if (args.level2 or args.factors) and args.limit is None:
        parser.error("--level2 and --factors solve the other levels' keep ratio under --limit: give --limit")
    torch.set_num_threads(1)
    source = resolve_model(args.model)
    if not hasattr(source, "folder"):
        parser.error(f"--model {args.model}: not a shipped trained model or its folder (tiny-shapes, tiny-shapes-xl)")
    model, vae_factor = source.folder, source.vae_factor
    size = read_config(model)["image_size"]
    meta = build_unet(source.unet_config(), device="meta")
    full_tmacs = count_phases(meta, ac.make_schedule("none", 1), height=size, width=size,
                              vae_factor=vae_factor).full_tmacs

    def share(sched: Schedule) -> float:
        report = count_phases(meta, sched, DEFAULT_PRUNING, height=size, width=size, vae_factor=vae_factor)
        return report.average_tmacs_with_scoring / full_tmacs

    def solve(level2) -> tuple[float, float] | None:
        """(level-2 keep, others' keep): the largest others' keep whose cost fits ``--limit``."""
        low, high = 0.01, 1.0
        if share(schedule(args.steps, level2(low), low)) > args.limit:
            return None
        for _ in range(12):
            middle = (low + high) / 2
            low, high = (middle, high) if share(schedule(args.steps, level2(middle), middle)) <= args.limit else (low, middle)
        return level2(low), low

    pipe = load_trained_pipeline(model)
    _, _, captions, _ = synthetic.make_dataset(args.prompts, seed=args.seed, size=size)

    def sample(sched: Schedule | None) -> np.ndarray:
        if sched is not None:
            ac.apply(pipe, sched, DEFAULT_PRUNING)
        try:
            out = pipe(captions, height=size, width=size, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, output_type="np",
                       generator=[torch.Generator().manual_seed(args.seed + i) for i in range(len(captions))])
        finally:
            if sched is not None:
                ac.remove(pipe)
        return (out.images * 255).round().astype(np.uint8)

    full = sample(None)
    points = [(f"pair {p}", *map(float, p.split(":"))) for p in args.pairs]
    for keep in args.level2:
        found = solve(lambda others, keep=keep: keep)
        points.append((f"level 2 at {keep:g}", *(found or (keep, None))))
    for factor in args.factors:
        found = solve(lambda others, factor=factor: min(1.0, factor * math.sqrt(others)))
        points.append((f"factor {factor:g}", *(found or (None, None))))
    print(f"{args.model}: {args.prompts} captions (seed {args.seed}), {args.steps} steps, guidance {args.guidance:g}")
    print(f"{'point':24s} {'level 2':>8s} {'others':>8s} {'MACs':>7s} {'PSNR':>7s}")
    for label, level2, others in points:
        if others is None:
            print(f"{label:24s} {'':>8s} {'':>8s}  does not fit under {args.limit:g}")
            continue
        started, sched = time.time(), schedule(args.steps, level2, others)
        images = sample(sched)
        psnr = np.mean([min(synthetic.psnr(a, b), 100.0) for a, b in zip(images, full)])
        print(f"{label:24s} {level2:8.4f} {others:8.4f} {share(sched):7.4f} {psnr:7.2f}   ({time.time() - started:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
