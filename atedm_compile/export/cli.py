"""``atedm-compile build | run | check``: the export commands (added to the main parser by
``add_export_commands``)."""

from __future__ import annotations

import io
import time
from pathlib import Path

from .manifest import BACKENDS, PRECISIONS
from .onnx import DEFAULT_OPSET, EXPORTERS


def add_export_commands(sub) -> None:
    """Add ``build``, ``run`` and ``check`` to the ``atedm-compile`` subparsers."""
    from ..cli import _add_pruning_options

    build = sub.add_parser("build", help="export one ONNX graph (and TensorRT engine) per schedule phase")
    build.add_argument("--model", default="tiny", help="config name (tiny, tiny-sd15, sdxl-base: random weights) "
                                                       "or a local diffusers pipeline / U-Net directory")
    build.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    build.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    build.add_argument("--batch", type=int, default=2, help="U-Net batch: 2 per image with guidance (default: 2)")
    build.add_argument("--precision", default="fp32", choices=PRECISIONS)
    build.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    build.add_argument("--exporter", default="torchscript", choices=EXPORTERS,
                       help="torch.onnx.export path: torchscript (dynamo=False, default, faster) or dynamo")
    build.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    build.add_argument("--seed", type=int, default=0, help="weights seed of a config-name model")
    build.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimisation level")
    build.add_argument("--out", required=True, help="output directory (new, empty, or an earlier build's)")
    _add_pruning_options(build)
    build.set_defaults(func=cmd_build)

    run = sub.add_parser("run", help="sample an image with the phase graphs of a build directory")
    run.add_argument("directory", help="a directory made by `atedm-compile build`")
    run.add_argument("--prompt", default="a small red triangle at the top left on a striped blue background")
    run.add_argument("--steps", type=int, default=None, help="sampling steps (default: the built count)")
    run.add_argument("--height", type=int, default=None, help="default: the built height")
    run.add_argument("--width", type=int, default=None, help="default: the built width")
    run.add_argument("--images", type=int, default=None, help="images per prompt (default: what the batch fits)")
    run.add_argument("--guidance", type=float, default=5.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", default=None, choices=BACKENDS, help="default: the built backend")
    run.add_argument("--providers", nargs="+", default=None, help="ONNX Runtime providers: cpu, cuda, tensorrt")
    run.add_argument("--fallback-pytorch", action="store_true",
                     help="on a step count or shape the build does not cover, warn and run the PyTorch runner")
    run.add_argument("--out", default="image.png", help="image file to write (PNG)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="verify a build: hashes, ONNX checker, TensorRT lint, TensorRT vs ORT")
    check.add_argument("directory")
    check.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT comparison")
    check.set_defaults(func=cmd_check)


def cmd_build(args) -> int:
    from ..cli import _pruning_config
    from .build import BuildConfig, build

    config = BuildConfig(
        model=args.model, schedule=args.schedule, num_steps=args.steps, keep_ratio=args.keep_ratio,
        prune_less_blocks=args.prune_less_blocks, pruning=_pruning_config(args), height=args.height,
        width=args.width, batch=args.batch, precision=args.precision, backend=args.backend, exporter=args.exporter,
        opset=args.opset, seed=args.seed, optimization_level=args.optimization_level,
    )
    started = time.perf_counter()
    manifest, records = build(config, args.out)
    out = Path(args.out)
    ran = sum(r.ran for r in records)
    print(f"{out}: {len(manifest.phases)} phases, {ran} of {len(records)} steps ran, "
          f"{time.perf_counter() - started:.1f} s")
    for phase in manifest.phases:
        print(f"  {phase.name}: steps {phase.start}-{phase.stop - 1}, {phase.onnx.file} {phase.onnx.bytes} bytes"
              + (f", {phase.engine.file} {phase.engine.bytes} bytes" if phase.engine else ""))
    if manifest.weights:
        print(f"  shared weights: {manifest.weights.file} {manifest.weights.bytes} bytes")
    return 0


def cmd_run(args) -> int:
    import torch

    from ..models import UNET_CONFIGS, load_pipeline, tiny_sdxl_pipeline
    from .manifest import read_manifest, write_atomically
    from .runtime import load

    directory = Path(args.directory)
    manifest = read_manifest(directory)
    name = manifest.model["name"]
    if name == "tiny":
        pipe = tiny_sdxl_pipeline(seed=manifest.model.get("seed", 0))
    elif name in UNET_CONFIGS:
        raise ValueError(f"{directory} was built from the bare U-Net config {name!r} (random weights, no text "
                         f"encoders or VAE): `run` needs a full pipeline, so build from 'tiny' or a pipeline directory")
    else:
        pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    guided = args.guidance > 1.0
    images = args.images or max(1, manifest.batch // (2 if guided else 1))
    steps = args.steps or manifest.num_steps
    height, width = args.height or manifest.height, args.width or manifest.width
    unet_batch = images * (2 if guided else 1)
    given = {"U-Net batch": (manifest.batch, unet_batch), "steps": (manifest.num_steps, steps),
             "size": (f"{manifest.height}x{manifest.width}", f"{height}x{width}")}
    wrong = {k: v for k, v in given.items() if v[0] != v[1]}
    if wrong and not args.fallback_pytorch:
        listing = ", ".join(f"{k}: built {a}, given {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"the request does not match the build in {directory} ({listing}; the U-Net batch is "
                         f"images x 2 with guidance > 1); rebuild, or pass --fallback-pytorch")
    fallback = pipe.unet if args.fallback_pytorch else None
    unet = load(directory, backend=args.backend, providers=args.providers, fallback=fallback,
                on_mismatch="fallback" if fallback is not None else "error")
    unet.attach(pipe)
    timings: dict[str, list[float]] = {}
    started = {}
    unet.register_forward_pre_hook(lambda *_: started.__setitem__("t", time.perf_counter()))
    unet.register_forward_hook(lambda *_: timings.setdefault(unet.calls[-1].phase, []).append(
        time.perf_counter() - started["t"]))
    generator = torch.Generator().manual_seed(args.seed)
    image = pipe(args.prompt, num_inference_steps=steps, height=height, width=width, guidance_scale=args.guidance,
                 num_images_per_prompt=images, generator=generator).images[0]
    print(f"{directory}: {steps} steps at {width}x{height}, backend {args.backend or manifest.backend}")
    for phase, seconds in timings.items():
        calls = [c.step for c in unet.calls if c.phase == phase]
        print(f"  {phase}: steps {min(calls)}-{max(calls)}, {len(calls)} calls, "
              f"{sum(seconds) / len(seconds):.4f} s per call")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, buffer.getvalue())
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    from .check import check

    report = check(args.directory, compare_tensorrt=not args.no_tensorrt)
    print("check passed" if report.ok else "check FAILED")
    return 0 if report.ok else 1


__all__ = ["add_export_commands"]
