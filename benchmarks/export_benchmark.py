"""Measure the step-specialised export on this machine (tiny model, CPU, ONNX Runtime).

    python benchmarks/export_benchmark.py --out /tmp/export-bench [--exporters] [--repeats 20]
    python benchmarks/export_benchmark.py --out /tmp/export-bench --build-sizes tiny half full

Prints: build time (cold, then cached), bytes on disk (all phases vs one phase), resident memory
after loading all phase sessions vs one and running each once (each in a fresh process; three
ways of loading, on the tiny model and on one with --wide times its channels, whose weights
outweigh ONNX Runtime's fixed cost per graph), ONNX Runtime seconds per U-Net call per phase next
to the unpruned U-Net and to sessions that optimise at load, and with --exporters the time of
both torch.onnx.export paths on the pruned phase.

With --build-sizes it only measures builds (fp16, atedm schedule, two phases), each in a fresh
process: the tiny model, SD-XL base at half its channels and SD-XL base, at 1024 px for both SD-XL
(random weights): seconds per step, peak resident memory against the weights' size, bytes on
disk. Each build directory is deleted after it is measured (SD-XL's weighs 5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_MEMORY_PROBE = r"""
import json, sys
from atedm_compile.export import read_manifest
from atedm_compile.export.onnxruntime import OrtEngine, SharedWeights, optimize_for_cpu
from atedm_compile.export.onnx import example_inputs

def rss_kib():  # resident set now, file-backed pages of the mapped weights included
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])

directory, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
manifest = read_manifest(directory)
feed = example_inputs(manifest.phases[0].inputs)
phases = manifest.phases[:count]
before = rss_kib()
if mode == "cpu-cache":  # made beforehand: this only reads it
    paths, shared = optimize_for_cpu(directory, manifest)
    engines = [OrtEngine(paths[p.name], shared, optimized=True) for p in phases]
else:
    shared = SharedWeights(f"{directory}/weights.bin", manifest.weights_index) if mode == "shared" else None
    engines = [OrtEngine(f"{directory}/{p.onnx.file}", shared) for p in phases]
for engine in engines:
    engine.infer(feed)
print(json.dumps({"baseline_kib": before, "peak_kib": rss_kib()}))
"""

MODES = {
    "cpu-cache": "optimised once for this CPU, weights shared (the default)",
    "shared": "optimised in each session, weights shared",
    "own": "optimised in each session, each its own weights",
}


def _memory(directory: Path, count: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(directory), str(count), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_table(directory: Path, manifest, label: str) -> None:
    from atedm_compile.export.onnxruntime import optimize_for_cpu

    started = time.perf_counter()
    optimize_for_cpu(directory, manifest)
    print(f"{label}: optimising the phase graphs for this CPU (first load only) took {time.perf_counter() - started:.1f} s")
    for mode, text in MODES.items():
        one_phase = _memory(directory, 1, mode)
        all_phases = _memory(directory, len(manifest.phases), mode)
        grow_one = one_phase["peak_kib"] - one_phase["baseline_kib"]
        grow_all = all_phases["peak_kib"] - all_phases["baseline_kib"]
        print(f"  RSS after loading and one call per phase, {text}: one phase +{grow_one / 1024:.1f} MiB, "
              f"all {len(manifest.phases)} phases +{grow_all / 1024:.1f} MiB over imports; all / one = "
              f"{grow_all / grow_one:.3f}")


def _step_times(directory: Path, repeats: int, cpu_cache: bool = True) -> dict[str, float]:
    from atedm_compile.export import load
    from atedm_compile.export.onnx import example_inputs

    unet = load(directory, cpu_cache=cpu_cache)
    feed = example_inputs(unet.manifest.phases[0].inputs)
    times: dict[str, list[float]] = {name: [] for name in unet.engines}
    for name, engine in unet.engines.items():
        engine.infer(feed)  # warm-up
    # Interleaved, so that load from other processes on a shared machine hits every phase alike.
    for _ in range(repeats):
        for name, engine in unet.engines.items():
            started = time.perf_counter()
            engine.infer(feed)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _exporter_times(directory: Path) -> dict[str, float]:
    import atedm_compile as ac
    from atedm_compile.export.manifest import io_specs
    from atedm_compile.export.onnx import export_phase
    from atedm_compile.models import build_unet

    unet = build_unet("tiny")
    runner = ac.apply(unet, ac.make_schedule("atedm", 4))
    runner.start(4)
    runner.use_phase("pruned")
    inputs, _ = io_specs(dict(unet.config), 2, 32, 32, "fp32")
    times = {}
    for exporter in ("torchscript", "dynamo"):
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            started = time.perf_counter()
            export_phase(unet, inputs, Path(tmp) / "model.onnx", exporter)
            times[exporter] = time.perf_counter() - started
    ac.remove(unet)
    return times


_BUILD_PROBE = r"""
import json, resource, sys, time
from atedm_compile import models
from atedm_compile.export import BuildConfig, build
from atedm_compile.export.build import _meta_unet

models.UNET_CONFIGS["sdxl-half"] = {**models.SDXL_BASE_UNET,
                                    "block_out_channels": [c // 2 for c in models.SDXL_BASE_UNET["block_out_channels"]]}
model, size, directory = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3]
config = BuildConfig(model=model, precision="fp16", height=size, width=size)
started = time.perf_counter()
manifest, records = build(config, directory, log=lambda _: None)
wall = time.perf_counter() - started
weights = sum(p.numel() * 2 for p in _meta_unet(models.unet_config(model), "fp16").parameters())
print(json.dumps({"wall": wall, "steps": {r.name: r.seconds for r in records},
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weights": weights,
                  "weights_bin": manifest.weights.bytes, "graphs": {p.name: p.onnx.bytes for p in manifest.phases}}))
"""

BUILD_SIZES = {"tiny": ("tiny", 0), "half": ("sdxl-half", 1024), "full": ("sdxl-base", 1024)}


def _build_sizes(out: Path, sizes: list[str]) -> None:
    import shutil

    print("build, fp16, atedm (2 phases), each in a fresh process; peak = the process's peak resident memory")
    for size in sizes:
        model, pixels = BUILD_SIZES[size]
        directory = out / f"build-{size}"
        shutil.rmtree(directory, ignore_errors=True)
        try:
            result = subprocess.run([sys.executable, "-c", _BUILD_PROBE, model, str(pixels), str(directory)],
                                    capture_output=True, text=True, check=True)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        numbers = json.loads(result.stdout.strip().splitlines()[-1])
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in numbers["steps"].items())
        graphs = sum(numbers["graphs"].values())
        print(f"  {size} ({model}{f' at {pixels} px' if pixels else ''}): {numbers['wall']:.1f} s in all; {steps}")
        print(f"    peak RSS {numbers['peak'] / 2**30:.2f} GiB = {numbers['peak'] / numbers['weights']:.2f} x the fp16 "
              f"weights ({numbers['weights'] / 2**30:.2f} GiB); on disk: weights.bin {numbers['weights_bin']} B, "
              f"graphs {graphs} B ({numbers['graphs']})")


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from atedm_compile.export import BuildConfig, build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/atedm-export-bench")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--wide", type=int, default=4,
                        help="also measure memory on the tiny topology with N x the channels (0: skip)")
    parser.add_argument("--exporters", action="store_true", help="also time both torch.onnx.export paths")
    parser.add_argument("--build-sizes", nargs="+", choices=list(BUILD_SIZES), default=None,
                        help="only measure fp16 builds of these models (tiny, half-width SD-XL, SD-XL at 1024 px)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.build_sizes:
        _build_sizes(out, args.build_sizes)
        return
    quiet = lambda _: None  # noqa: E731

    # A fresh directory, so that the first build is a cold one.
    pruned_dir, full_dir = Path(tempfile.mkdtemp(dir=out, prefix="atedm-")), out / "none"
    started = time.perf_counter()
    manifest, _ = build(BuildConfig(model="tiny", num_steps=args.steps), pruned_dir, log=quiet)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    build(BuildConfig(model="tiny", num_steps=args.steps), pruned_dir, log=quiet)
    cached = time.perf_counter() - started
    build(BuildConfig(model="tiny", schedule="none", num_steps=args.steps), full_dir, log=quiet)
    print(f"build (tiny, {len(manifest.phases)} phases): {cold:.1f} s cold, {cached:.2f} s cached")

    weights = manifest.weights.bytes
    graphs = {p.name: p.onnx.bytes for p in manifest.phases}
    one = weights + next(iter(graphs.values()))
    everything = weights + sum(graphs.values())
    print(f"disk: weights.bin {weights} B; graphs {graphs}; one phase {one} B, all phases {everything} B "
          f"= {everything / one:.3f} x one phase")

    _memory_table(pruned_dir, manifest, "tiny")
    if args.wide:
        # The same topology with every channel count x N: N^2 the weights, the same graph.
        from atedm_compile.models import TINY_SDXL_UNET, build_unet

        wide_model, wide_dir = out / f"wide{args.wide}-unet", out / f"wide{args.wide}"
        if not (wide_model / "config.json").is_file():
            channels = [c * args.wide for c in TINY_SDXL_UNET["block_out_channels"]]
            build_unet({**TINY_SDXL_UNET, "block_out_channels": channels}).save_pretrained(wide_model)
        wide, _ = build(BuildConfig(model=str(wide_model), num_steps=args.steps, height=256, width=256), wide_dir,
                        log=quiet)
        _memory_table(wide_dir, wide, f"tiny x{args.wide} channels, weights.bin {wide.weights.bytes / 2**20:.0f} MiB")

    times = _step_times(pruned_dir, args.repeats)
    times.update({f"unpruned ({k})": v for k, v in _step_times(full_dir, args.repeats).items()})
    times.update({f"{k}, optimised per session": v for k, v in _step_times(pruned_dir, args.repeats, False).items()})
    print("ONNX Runtime CPU, median seconds per U-Net call (batch 2, 256 px): "
          + ", ".join(f"{k} {v:.4f}" for k, v in times.items()))

    if args.exporters:
        exporters = _exporter_times(out)
        print("torch.onnx.export of the pruned phase: "
              + ", ".join(f"{'dynamo=False' if k == 'torchscript' else 'dynamo=True'} {v:.1f} s"
                          for k, v in exporters.items()))


if __name__ == "__main__":
    main()
