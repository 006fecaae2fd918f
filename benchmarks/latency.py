"""Per-step CPU time of the full U-Net and of each phase, side by side in one run.

SD-XL topology at half width (channels 160/320/640, layers 1/2/10) at 512 px, batch 2 (a CFG
pair), random weights. Prints, per variant: TMACs, median CPU seconds per U-Net call (and wall
seconds), the speed-up over the full model, the FLOPs-ideal speed-up (full TMACs / phase TMACs,
its own scoring and recovery work counted in) and their ratio (efficiency, from CPU time). Each
phase is timed under the paper's method (``PruningConfig()``) and the package default
(``DEFAULT_PRUNING``: patch winners, distinct fill, delta recovery), ``--configs`` to choose.

CPU time of one thread (the default) is the work done, whatever else the machine runs: on these
shared machines wall time of the same call varies by 15% from one call to the next. Variants are
timed round-robin so that any drift hits them all alike.

    python benchmarks/latency.py [--repeats 5] [--height 512] [--schedule atedm] [--threads 1] [--dtype bf16]
        [--configs paper default] [--compiled]

``--compiled`` times every variant under ``torch.compile`` (inductor's C++ code on the CPU;
``Runner.compile``: one compiled graph per phase, the full model's included); the warm-up round
compiles them (minutes each on 2 cores), and the table says how long that took.

For a GPU (CUDA events, eager and compiled, SD-XL at 1024 px): ``benchmarks/gpu_latency.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile.config import DEFAULT_PRUNING, PruningConfig  # noqa: E402
from atedm_compile.devices import DTYPES  # noqa: E402
from atedm_compile.flops import count_phases, unet_inputs  # noqa: E402
from atedm_compile.models import SDXL_BASE_UNET, build_unet  # noqa: E402

HALF_WIDTH_SDXL = {**SDXL_BASE_UNET, "block_out_channels": [160, 320, 640]}
CONFIGS = {"paper": PruningConfig(), "default": DEFAULT_PRUNING}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedule", default="atedm", choices=ac.PRESETS)
    parser.add_argument("--keep-ratio", type=float, default=0.37)
    parser.add_argument("--iterations", type=int, default=PruningConfig.iterations)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights and activations (default: fp32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; CPU time sums them, spin-waits included, so 1 measures best")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="pruning settings to time each phase under (default: both)")
    parser.add_argument("--compiled", action="store_true",
                        help="time the variants under torch.compile (Runner.compile, inductor) instead of eagerly")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs = {name: dataclasses.replace(CONFIGS[name], iterations=args.iterations) for name in args.configs}
    schedule = ac.make_schedule(args.schedule, 50, keep_ratio=args.keep_ratio)
    meta = build_unet(HALF_WIDTH_SDXL, device="meta")
    tmacs: dict[str, float] = {}
    for label, config in configs.items():
        cost = count_phases(meta, schedule, config, args.height, args.height)
        tmacs |= {"full": cost.full_tmacs} | {f"{p.name} ({label})": p.tmacs_with_scoring for p in cost.phases}

    unet = build_unet(HALF_WIDTH_SDXL, dtype=DTYPES[args.dtype])
    inputs = unet_inputs(unet, 2, args.height // 8, args.height // 8, device="cpu", dtype=DTYPES[args.dtype])
    runners, forwards = {}, {}
    for label, config in configs.items():  # installed in turn, one at a time
        runners[label] = ac.apply(unet, schedule, config)
        runners[label].start(schedule.num_steps)
        if args.compiled:  # kept, so that each install below puts the runner's own compiled forward back
            forwards[label] = runners[label].compile().unet.forward
        ac.remove(unet)
    variants = [(None, None)] + [(label, p.name) for label in configs for p in schedule.phases]
    names = ["full" if phase is None else f"{phase} ({label})" for label, phase in variants]
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    warmup: dict[str, float] = {}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name, (label, phase) in zip(names, variants):
                runner = runners[label or next(iter(runners))]
                runner.install()
                if args.compiled:
                    unet.forward = forwards[label or next(iter(runners))]
                runner.use_phase(phase)
                start, start_cpu = time.perf_counter(), time.process_time()
                unet(**inputs)
                if repeat:  # the first round warms up (and compiles)
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start)
                else:
                    warmup[name] = time.perf_counter() - start
                runner.uninstall()

    full = statistics.median(cpu["full"])
    mode = (f"compiled (torch.compile, inductor; first calls {min(warmup.values()):.0f}-{max(warmup.values()):.0f} s)"
            if args.compiled else "eager")
    print(f"SD-XL half width at {args.height} px, batch 2, {args.dtype}, {args.threads} threads, schedule {args.schedule}, "
          f"keep {args.keep_ratio}, G-WPR rounds {args.iterations}; {mode}; median of {args.repeats} calls")
    header = (f"{'variant':<21} {'TMACs':>7} {'CPU s/step':>11} {'wall s/step':>12} {'speed-up':>9} "
              f"{'FLOPs ratio':>12} {'efficiency':>11}")
    print(header)
    print("-" * len(header))
    for name, samples in cpu.items():
        seconds = statistics.median(samples)
        speedup, ideal = full / seconds, tmacs["full"] / tmacs[name]
        print(f"{name:<21} {tmacs[name]:>7.4f} {seconds:>11.3f} {statistics.median(wall[name]):>12.3f} "
              f"{speedup:>8.3f}x {ideal:>11.3f}x {speedup / ideal:>11.3f}")


if __name__ == "__main__":
    main()
