"""U-Net latency on a GPU, side by side in one run: the full model (diffusers' fused SDPA
attention), AT-EDM's prune-less and pruned phases, and ToMe at the pruned phase's MACs, each eager
and compiled (``Runner.compile``); then the whole DSAP sampling loop against the full model's.

SD-XL base config with random weights, built on the meta device and drawn on the GPU in the
chosen dtype (no host copy); 1024 x 1024 px, batch 2 (a CFG pair). Per variant: warm-up calls
(which compile), then the median of ``--calls`` calls timed with CUDA events, variants round-robin;
peak memory of one call. Columns: TMACs (with scoring), ms per U-Net call, speed-up over the full
model of the same mode, the FLOPs-ideal speed-up (full TMACs / variant TMACs), their ratio
(efficiency) and peak memory (GPU only).

    python benchmarks/gpu_latency.py                       # sdxl-base, cuda, fp16, 1024 px, batch 2
    python benchmarks/gpu_latency.py --tome-keep 0.4536    # skip solving ToMe's keep ratio (40 s of CPU)
    python benchmarks/gpu_latency.py --device cpu --model tiny --calls 3 --modes eager   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile import triton_map  # noqa: E402
from atedm_compile.ops import attention  # noqa: E402
from atedm_compile.config import PruningConfig  # noqa: E402
from atedm_compile.devices import DTYPES, Stopwatch, resolve_device, resolve_dtype, synchronize  # noqa: E402
from atedm_compile.files import write_atomically  # noqa: E402
from atedm_compile.flops import count_phases, fit_keep_ratio, unet_inputs  # noqa: E402
from atedm_compile.models import build_unet, unet_config, vae_factor  # noqa: E402
from atedm_compile.passes import ToMeConfig  # noqa: E402

TOME_MIN_KEEP = ToMeConfig().lowest_keep  # 0.25: ToMe merges at most 75% with 2 x 2 cells
# pruned/triton: the pruned phase with its attention maps from the Triton kernel
# (ops.attention_path("triton")); where Triton cannot run, left out with a line saying so.
VARIANTS = ("prune-less", "pruned", "pruned/triton", "ToMe", "DSAP")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _costs(args, schedule, config):
    """TMACs (with scoring) per variant, ToMe's keep ratio, and the DSAP average."""
    meta = build_unet(args.model, device="meta")
    factor = vae_factor(args.model)
    cost = count_phases(meta, schedule, config, args.height, args.width, vae_factor=factor)
    tmacs = {"full": cost.full_tmacs} | {p.name: p.tmacs_with_scoring for p in cost.phases}
    pruned = next(p for p in cost.phases if p.name == "pruned")
    tmacs["pruned/triton"] = pruned.tmacs_with_scoring  # the same work, another kernel for the map
    tome_keep = args.tome_keep
    if "ToMe" not in args.variants:
        return tmacs, tome_keep, cost.average_tmacs_with_scoring
    if tome_keep is None:
        _log("solving ToMe's keep ratio to the pruned phase's MACs (--tome-keep skips this)")
        # Both with their own work counted in (ToMe's matching; the pruned phase's scoring and
        # recovery), as the FLOPs ratios below and the quality benchmark count them.
        tome_keep, _, _ = fit_keep_ratio(meta, pruned.tmacs_with_scoring * (1 + 1e-9), "uniform", 1, ToMeConfig(),
                                         lowest=TOME_MIN_KEEP, height=args.height, width=args.width,
                                         vae_factor=factor, full_flops=cost.full_flops)
    tome = count_phases(meta, ac.make_schedule("uniform", 1, keep_ratio=tome_keep), ToMeConfig(), args.height,
                        args.width, vae_factor=factor, full_flops=cost.full_flops)
    tmacs["ToMe"] = tome.phases[0].tmacs_with_scoring
    return tmacs, tome_keep, cost.average_tmacs_with_scoring


def _unet_call(unet, inputs):
    return unet(**inputs).sample


def _peak_memory(device, unet, inputs) -> tuple[float, float] | tuple[None, None]:
    """(peak MiB during one call, of which above what was allocated before it)."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _unet_call(unet, inputs)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def _path(path: str | None):
    return attention.attention_path(path) if path else contextlib.nullcontext()


def _time_variants(args, device, unet, inputs, runner, variants: dict[str, tuple[str | None, str | None]],
                   compiled: bool, results: dict) -> None:
    """Warm up each variant (phase, attention path; compiling it), then time them round-robin; ms
    per call and memory into ``results``. A variant other than the full model that fails in its
    warm-up is recorded with its error and left out; the others are still timed."""
    variants = dict(variants)
    for name, (phase, path) in list(variants.items()):
        runner.use_phase(phase)
        started = time.perf_counter()
        try:
            with _path(path):
                for _ in range(max(1, args.warmup)):
                    _unet_call(unet, inputs)
            synchronize(device)
        except Exception as error:
            if name == "full":
                raise
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            del variants[name]
            _log(f"  {name}: failed in its warm-up, left out")
            continue
        _log(f"  {name}: {max(1, args.warmup)} warm-up calls in {time.perf_counter() - started:.1f} s"
             f"{' (compiling)' if compiled else ''}")
    watches = {name: Stopwatch(device) for name in variants}
    for _ in range(args.calls):
        for name, (phase, path) in variants.items():
            runner.use_phase(phase)
            with watches[name], _path(path):
                _unet_call(unet, inputs)
    for name, (phase, path) in variants.items():
        runner.use_phase(phase)
        with _path(path):
            peak, above = _peak_memory(device, unet, inputs)
        results[name] = {"ms": statistics.median(watches[name].milliseconds()), "peak_mib": peak,
                         "above_before_mib": above}
        _log(f"  {name}: {results[name]['ms']:.2f} ms per call, peak {_fmt(peak, 0).strip()} MiB")


def _dsap_loop(args, device, unet, inputs, runner) -> dict:
    """The sampling loop's U-Net calls: the DSAP schedule against the full model at every step."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    loops = {"full": Stopwatch(device), "DSAP": Stopwatch(device)}
    for _ in range(args.loops):
        runner.start(args.steps)
        with loops["DSAP"]:
            for step in range(args.steps):
                runner.set_step(step)
                _unet_call(unet, inputs)
        runner.use_phase(None)
        with loops["full"]:
            for _ in range(args.steps):
                _unet_call(unet, inputs)
    out = {name: statistics.median(watch.milliseconds()) for name, watch in loops.items()}
    out["graphs_compiled_in_loop"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    _log(f"  sampling loop: full {out['full']:.1f} ms, DSAP {out['DSAP']:.1f} ms, "
         f"{out['graphs_compiled_in_loop']} graphs compiled in it")
    return out


def run_mode(args, device, unet, inputs, schedule, config, tome_keep, mode: str, results: dict) -> None:
    """Every variant of one mode, into ``results`` as each is measured (an interrupted run keeps
    what it has): the full model and the phases side by side (round-robin), the DSAP loop, then
    the pruned phase with the Triton map, then ToMe."""
    compiled = mode == "compiled"
    options = {"mode": args.compile_mode, "backend": args.compile_backend}
    runner = ac.apply(unet, schedule, config)
    try:
        runner.start(args.steps)
        if compiled:
            runner.compile(**options)
        phases = [p.name for p in schedule.phases]
        variants = {"full": (None, None)} | {name: (name, None) for name in phases if name in args.variants}
        _time_variants(args, device, unet, inputs, runner, variants, compiled, results)
        if "DSAP" in args.variants:
            results["DSAP"] = _dsap_loop(args, device, unet, inputs, runner)
        # After the rows the targets are read from: its compilation (a graph of its own) cannot
        # leave them unmeasured when time runs out.
        if "pruned/triton" in args.variants:
            _time_variants(args, device, unet, inputs, runner, {"pruned/triton": ("pruned", "triton")}, compiled,
                           results)
    finally:
        ac.remove(unet)
    if "ToMe" not in args.variants:
        return
    runner = ac.apply(unet, ac.make_schedule("uniform", 1, keep_ratio=tome_keep), ToMeConfig())
    try:
        runner.start(1)
        if compiled:
            runner.compile(**options)
        _time_variants(args, device, unet, inputs, runner, {"ToMe": ("pruned", None)}, compiled, results)
    finally:
        ac.remove(unet)


def _fmt(value, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_tables(report: dict) -> None:
    tmacs = report["tmacs"]
    print(report["title"])
    header = (f"{'mode':<9} {'variant':<13} {'TMACs':>7} {'ms/call':>9} {'speed-up':>9} {'FLOPs ratio':>12} "
              f"{'efficiency':>11} {'peak MiB':>9} {'above MiB':>10}")
    print(header)
    print("-" * len(header))
    for mode, results in report["modes"].items():
        if "error" in results:
            print(f"{mode:<9} stopped: {results['error']}")
        if "full" not in results:
            continue
        full = results["full"]["ms"]
        for name in ["full", *[n for n in results if n not in ("full", "DSAP", "error")]]:
            row = results[name]
            if "error" in row:
                print(f"{mode:<9} {name:<13} failed: {row['error']}")
                continue
            speedup, ideal = full / row["ms"], tmacs["full"] / tmacs[name]
            print(f"{mode:<9} {name:<13} {tmacs[name]:>7.4g} {row['ms']:>9.2f} {speedup:>8.3f}x {ideal:>11.3f}x "
                  f"{speedup / ideal:>11.3f} {_fmt(row['peak_mib'], 9)} {_fmt(row['above_before_mib'], 10)}")
    if not any("DSAP" in results for results in report["modes"].values()):
        return
    print()
    print(f"Sampling loop, {report['steps']} U-Net calls ({report['schedule']}), median of {report['loops']}:")
    header = (f"{'mode':<9} {'full ms':>10} {'DSAP ms':>10} {'speed-up':>9} {'FLOPs ratio':>12} {'efficiency':>11} "
              f"{'graphs compiled in loop':>24}")
    print(header)
    print("-" * len(header))
    ideal = tmacs["full"] / report["dsap_average_tmacs"]
    for mode, results in report["modes"].items():
        if "DSAP" not in results:
            continue
        loop = results["DSAP"]
        speedup = loop["full"] / loop["DSAP"]
        print(f"{mode:<9} {loop['full']:>10.1f} {loop['DSAP']:>10.1f} {speedup:>8.3f}x {ideal:>11.3f}x "
              f"{speedup / ideal:>11.3f} {loop['graphs_compiled_in_loop']:>24}")


def print_targets(report: dict) -> None:
    """Issue 9's targets, read off the compiled mode: the pruned phase at 0.9 of its FLOPs-ideal
    speed-up over the full model, the sampling loop at 1.35x, peak memory no higher than the full
    model's."""
    results, tmacs = report["modes"].get("compiled", {}), report["tmacs"]
    if "full" not in results:
        return
    print()
    print("Targets (compiled mode):")
    for name in ("pruned", "pruned/triton"):
        if "ms" not in results.get(name, {}):
            continue
        speedup = results["full"]["ms"] / results[name]["ms"]
        efficiency = speedup / (tmacs["full"] / tmacs[name])
        print(f"  {name} phase efficiency {efficiency:.3f} (speed-up {speedup:.3f}x), target >= 0.90: "
              f"{'met' if efficiency >= 0.9 else 'NOT met'}")
        # Under CUDA graphs every graph's memory comes from one pool set aside when it is
        # recorded, so a call allocates nothing: peak memory is read off the eager rows.
        for mode in ("eager",) if report.get("cuda_graphs") else ("eager", "compiled"):
            rows = report["modes"].get(mode, {})
            peaks = rows.get("full", {}).get("peak_mib"), rows.get(name, {}).get("peak_mib")
            if None not in peaks:
                print(f"  peak memory {name} ({mode}) {peaks[1]:.0f} MiB vs full {peaks[0]:.0f} MiB: "
                      f"{'met' if peaks[1] <= peaks[0] else 'NOT met'}")
    if "DSAP" in results:
        speedup = results["DSAP"]["full"] / results["DSAP"]["DSAP"]
        print(f"  sampling loop speed-up {speedup:.3f}x, target >= 1.35x: {'met' if speedup >= 1.35 else 'NOT met'}")


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(report, indent=2).encode())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-base", help="U-Net config name (default: sdxl-base)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--height", type=int, help="default: the model's own image size")
    parser.add_argument("--width", type=int, help="default: --height")
    parser.add_argument("--batch", type=int, default=2, help="U-Net batch (default: 2, one CFG pair)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant (median; default: 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls per variant first (default: 3; at least one is made)")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled or both (default)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile mode (default: reduce-overhead, CUDA graphs, on a GPU; default on the CPU)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument("--schedule", default="atedm", choices=[p for p in ac.PRESETS if p not in ("none", "uniform")])
    parser.add_argument("--keep-ratio", type=float, default=0.37)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of the DSAP loop (default: 50)")
    parser.add_argument("--loops", type=int, default=3, help="sampling loops timed (median; default: 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"what to time besides the full model (default: {','.join(VARIANTS)})")
    parser.add_argument("--tome-keep", type=float, help="ToMe's keep ratio (1 - merge ratio); default: solved so "
                                                         "that its MACs are at most the pruned phase's")
    parser.add_argument("--map-chunk-mib", type=float, help=f"largest chunk of the attention map's scores, compute "
                                                            f"dtype and float32 together (default: "
                                                            f"{attention.MAP_CHUNK_BYTES / 2**20:g} MiB)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("eager", "compiled")] or (not args.modes and ["(none)"])
    if bad:
        parser.error(f"--modes {','.join(bad)}: choose eager, compiled or eager,compiled")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"--variants {','.join(unknown)}: choose from {','.join(VARIANTS)}")
    for name in ("batch", "calls", "warmup", "steps", "loops"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} {getattr(args, name)} must be at least {0 if name == 'warmup' else 1}")
    try:
        unet_config(args.model)
        args.device = resolve_device(args.device)
        args.dtype = resolve_dtype(args.dtype or ("fp16" if args.device.type == "cuda" else "fp32"))
        if args.tome_keep is not None and not TOME_MIN_KEEP <= args.tome_keep <= 1.0:
            raise ValueError(f"--tome-keep {args.tome_keep} is outside [{TOME_MIN_KEEP}, 1]")
        ac.make_schedule(args.schedule, args.steps, keep_ratio=args.keep_ratio)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    args.compile_mode = args.compile_mode or ("reduce-overhead" if args.device.type == "cuda" else "default")
    if "pruned/triton" in args.variants and not triton_map.available(args.device):
        _log(f"pruned/triton left out: the Triton map needs Triton and a CUDA device (here: {args.device})")
        args.variants.remove("pruned/triton")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, args.dtype
    if args.map_chunk_mib is not None:
        attention.MAP_CHUNK_BYTES = int(args.map_chunk_mib * 2**20)
    factor = vae_factor(args.model)
    size = build_unet(args.model, device="meta").config.sample_size * factor
    args.height = args.height or size
    args.width = args.width or args.height

    config = PruningConfig()
    schedule = ac.make_schedule(args.schedule, args.steps, keep_ratio=args.keep_ratio)
    started = time.perf_counter()
    tmacs, tome_keep, dsap_tmacs = _costs(args, schedule, config)
    _log(f"FLOPs counted in {time.perf_counter() - started:.1f} s; building {args.model} on {device} in {dtype}")
    unet = build_unet(args.model, device=device, dtype=dtype)
    inputs = unet_inputs(unet, args.batch, args.height // factor, args.width // factor, device=device, dtype=dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    report = {
        "title": (f"{args.model} at {args.width}x{args.height}, batch {args.batch}, {str(dtype).split('.')[-1]} on "
                  f"{where}, torch {torch.__version__}; keep {args.keep_ratio}, ToMe keep {_fmt(tome_keep, 0, 4)}; "
                  f"compiled: torch.compile mode {args.compile_mode}, backend {args.compile_backend}; "
                  f"median of {args.calls} calls after {args.warmup} warm-up"),
        "model": args.model, "device": where, "dtype": str(dtype), "height": args.height, "width": args.width,
        "batch": args.batch, "calls": args.calls, "tome_keep": tome_keep, "tmacs": tmacs,
        "dsap_average_tmacs": dsap_tmacs, "steps": args.steps, "schedule": schedule.name, "loops": args.loops,
        "map_chunk_bytes": attention.MAP_CHUNK_BYTES, "modes": {},
        "cuda_graphs": args.compile_mode in ("reduce-overhead", "max-autotune") or args.compile_backend == "cudagraphs",
    }
    failed = False
    with torch.no_grad():
        for mode in args.modes:
            _log(f"{mode}:")
            results = report["modes"][mode] = {}
            try:
                run_mode(args, device, unet, inputs, schedule, config, tome_keep, mode, results)
            except KeyboardInterrupt:  # out of time (timeout --signal=INT): keep what was measured
                results["error"] = "interrupted"
                failed = True
                break
            except Exception as error:  # one mode failing must not lose the other's numbers
                traceback.print_exc()
                results["error"] = f"{type(error).__name__}: {error}"[:300]
                failed = True
            finally:
                if args.json:
                    _write_json(args.json, report)
    failed = failed or any("error" in row for results in report["modes"].values() for row in results.values()
                           if isinstance(row, dict))
    print_tables(report)
    print_targets(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
