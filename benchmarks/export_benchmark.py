"""Measure the step-specialised export on this machine (tiny model, CPU, ONNX Runtime).

    python benchmarks/export_benchmark.py --out /tmp/export-bench [--exporters] [--repeats 20]

Prints: build time (cold, then cached), bytes on disk (all phases vs one phase), resident memory
after loading all phase sessions vs one and running each once (each in a fresh process), ONNX Runtime seconds per U-Net call
per phase next to the unpruned U-Net, and with --exporters the time of both torch.onnx.export
paths on the pruned phase.
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
from atedm_compile.export.onnxruntime import OrtEngine, SharedWeights
from atedm_compile.export.onnx import example_inputs

def rss_kib():  # resident set now, file-backed pages of the mapped weights included
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])

directory, count, share = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
manifest = read_manifest(directory)
feed = example_inputs(manifest.phases[0].inputs)
before = rss_kib()
shared = SharedWeights(f"{directory}/weights.bin", manifest.weights_index) if share else None
engines = [OrtEngine(f"{directory}/{p.onnx.file}", shared) for p in manifest.phases[:count]]
for engine in engines:
    engine.infer(feed)
print(json.dumps({"baseline_kib": before, "peak_kib": rss_kib()}))
"""


def _memory(directory: Path, count: int, share: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(directory), str(count), "1" if share else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _step_times(directory: Path, repeats: int) -> dict[str, float]:
    from atedm_compile.export import load
    from atedm_compile.export.onnx import example_inputs

    unet = load(directory)
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


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from atedm_compile.export import BuildConfig, build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/atedm-export-bench")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--exporters", action="store_true", help="also time both torch.onnx.export paths")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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

    for share in (True, False):
        one_phase = _memory(pruned_dir, 1, share)
        all_phases = _memory(pruned_dir, len(manifest.phases), share)
        grow_one = one_phase["peak_kib"] - one_phase["baseline_kib"]
        grow_all = all_phases["peak_kib"] - all_phases["baseline_kib"]
        print(f"RSS after loading and one call per phase, {'shared weights' if share else 'each session its own weights'}: one phase "
              f"{one_phase['peak_kib'] / 1024:.1f} MiB (+{grow_one / 1024:.1f} over imports), all phases "
              f"{all_phases['peak_kib'] / 1024:.1f} MiB (+{grow_all / 1024:.1f}); growth ratio "
              f"{grow_all / grow_one:.2f}")

    times = _step_times(pruned_dir, args.repeats)
    times.update({f"unpruned ({k})": v for k, v in _step_times(full_dir, args.repeats).items()})
    print("ONNX Runtime CPU, median seconds per U-Net call (batch 2, 256 px): "
          + ", ".join(f"{k} {v:.4f}" for k, v in times.items()))

    if args.exporters:
        exporters = _exporter_times(out)
        print("torch.onnx.export of the pruned phase: "
              + ", ".join(f"{'dynamo=False' if k == 'torchscript' else 'dynamo=True'} {v:.1f} s"
                          for k, v in exporters.items()))


if __name__ == "__main__":
    main()
