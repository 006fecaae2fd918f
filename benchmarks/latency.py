"""Per-step CPU time of the full U-Net and of each phase, side by side in one run.

SD-XL topology at half width (channels 160/320/640, layers 1/2/10) at 512 px, batch 2 (a CFG
pair), random weights. Prints, per variant: TMACs, median seconds per U-Net call, the speed-up over
the full model, the FLOPs-ideal speed-up (full TMACs / phase TMACs) and their ratio (efficiency).
Variants are timed round-robin so that drift of a noisy machine hits them all alike.

    python benchmarks/latency.py [--repeats 5] [--height 512] [--schedule atedm] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile.config import PruningConfig  # noqa: E402
from atedm_compile.flops import count_phases, unet_inputs  # noqa: E402
from atedm_compile.models import SDXL_BASE_UNET, build_unet  # noqa: E402

HALF_WIDTH_SDXL = {**SDXL_BASE_UNET, "block_out_channels": [160, 320, 640]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedule", default="atedm", choices=ac.PRESETS)
    parser.add_argument("--keep-ratio", type=float, default=0.37)
    parser.add_argument("--iterations", type=int, default=PruningConfig.iterations)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = PruningConfig(iterations=args.iterations)
    schedule = ac.make_schedule(args.schedule, 50, keep_ratio=args.keep_ratio)
    cost = count_phases(build_unet(HALF_WIDTH_SDXL, device="meta"), schedule, config, args.height, args.height)
    tmacs = {"full": cost.full_tmacs} | {p.name: p.tmacs_with_scoring for p in cost.phases}

    unet = build_unet(HALF_WIDTH_SDXL)
    inputs = unet_inputs(unet, 2, args.height // 8, args.height // 8, device="cpu")
    runner = ac.apply(unet, schedule, config)
    runner.start(schedule.num_steps)
    variants = [None] + [p.name for p in schedule.phases]
    times: dict[str, list[float]] = {name or "full": [] for name in variants}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name in variants:
                runner.use_phase(name)
                start = time.perf_counter()
                unet(**inputs)
                elapsed = time.perf_counter() - start
                if repeat:  # the first round warms up
                    times[name or "full"].append(elapsed)
    ac.remove(unet)

    full = statistics.median(times["full"])
    print(f"SD-XL half width at {args.height} px, batch 2, {args.threads} threads, schedule {args.schedule}, "
          f"keep {args.keep_ratio}, G-WPR rounds {args.iterations}; median of {args.repeats} calls")
    header = f"{'variant':<12} {'TMACs':>7} {'s/step':>8} {'speed-up':>9} {'FLOPs ratio':>12} {'efficiency':>11}"
    print(header)
    print("-" * len(header))
    for name, samples in times.items():
        seconds = statistics.median(samples)
        speedup, ideal = full / seconds, tmacs["full"] / tmacs[name]
        print(f"{name:<12} {tmacs[name]:>7.4f} {seconds:>8.3f} {speedup:>8.3f}x {ideal:>11.3f}x {speedup / ideal:>11.3f}")


if __name__ == "__main__":
    main()
