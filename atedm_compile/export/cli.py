"""``atedm-compile build | run | check``: the export commands (added to the main parser by
``add_export_commands``)."""

from __future__ import annotations

import time
from pathlib import Path

from .backends import BACKENDS, DEFAULT_BACKEND
from .extras import EXTRAS, require_extra
from .manifest import MANIFEST, PRECISIONS
from .onnx import DEFAULT_OPSET, EXPORTERS, OPSETS


def add_export_commands(sub) -> None:
    """Add ``build``, ``run`` and ``check`` to the ``atedm-compile`` subparsers."""
    from ..arguments import (HelpFormatter, add_pruning_options, guidance_scale, positive_int, seed_int, step_count,
                             utf8_text)
    from ..config import MAX_STEPS

    build = sub.add_parser(
        "build", help="export one ONNX graph (and TensorRT engine) per schedule phase", formatter_class=HelpFormatter,
        description="Export one ONNX graph (and TensorRT engine) per schedule phase into OUT, sharing one "
                    "weights.bin, with manifest.json. Steps whose output exists are skipped; an interrupted build "
                    "resumes; a second build into the same OUT waits for the first.",
        epilog="examples:\n  atedm-compile build --model tiny-shapes --steps 20 --out build/tiny-shapes\n"
               "  atedm-compile build --model tiny --schedule uniform --steps 4 --keep-ratio 0.5 --out build/tiny")
    build.add_argument("--model", default="tiny",
                       help="config name (tiny, tiny-sd15, sdxl-base: random weights), a shipped trained model "
                            "(tiny-shapes, tiny-shapes-xl) or its folder, or a local diffusers pipeline / U-Net directory")
    build.add_argument("--height", type=positive_int, default=None,
                       help="image height in pixels (default: the model's)")
    build.add_argument("--width", type=positive_int, default=None,
                       help="image width in pixels (default: --height where given, else the model's)")
    build.add_argument("--batch", type=positive_int, default=2, help="U-Net batch: 2 per image with guidance")
    build.add_argument("--precision", default="fp32", choices=PRECISIONS, help="weights and activations")
    build.add_argument("--backend", default=DEFAULT_BACKEND, choices=list(BACKENDS),
                       help="onnxruntime (ONNX graphs) or tensorrt (plus one engine per phase; needs TensorRT)")
    build.add_argument("--exporter", default="torchscript", choices=EXPORTERS,
                       help="torch.onnx.export path: torchscript (dynamo=False, faster) or dynamo")
    build.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS,
                       metavar=f"{{{OPSETS.start}..{OPSETS.stop - 1}}}", help="ONNX opset")
    build.add_argument("--seed", type=seed_int, default=0, help="weights seed of a config-name model")
    build.add_argument("--optimization-level", type=int, default=3, choices=range(6), metavar="{0..5}",
                       help="TensorRT builder optimisation level")
    build.add_argument("--verify", action="store_true",
                       help="after the build, compare each phase graph in ONNX Runtime with the PyTorch U-Net on "
                            "random inputs (a full-size U-Net call each: needs the memory and time for it)")
    build.add_argument("--out", required=True, help="output directory (new, empty, or an earlier build's)")
    add_pruning_options(build)
    from ..config import CACHE_FORECASTS, CACHE_SPACINGS

    cache = build.add_argument_group(
        "cached steps", "DeepCache's rule across the phases: each phase gets a full-step graph that also outputs the "
                        "deep features and a cached-step graph that takes them (default: no cached steps)")
    cache.add_argument("--cache-interval", type=int, default=None,
                       help="steps per full step (2: every other step is cached); turns caching on")
    cache.add_argument("--cache-branch", type=int, default=None,
                       help="skip branch the cached steps cut at (default 0: only the outermost layers run)")
    cache.add_argument("--cache-spacing", default=None, choices=CACHE_SPACINGS,
                       help="where the full steps fall (default uniform)")
    cache.add_argument("--cache-power", type=float, default=None, help="non-uniform spacing: its exponent, > 1")
    cache.add_argument("--cache-center", type=int, default=None,
                       help="non-uniform spacing: the step the full steps crowd around")
    cache.add_argument("--cache-forecast", default=None, choices=CACHE_FORECASTS,
                       help="what cached steps read: none (the last full step's features, DeepCache's) or linear "
                            "(their line through the last two full steps; default none)")
    build.set_defaults(func=cmd_build)

    run = sub.add_parser(
        "run", help="sample an image with the phase graphs of a build directory", formatter_class=HelpFormatter,
        description="Sample an image with the phase graphs of DIRECTORY: ONNX Runtime (or TensorRT) sessions "
                    "switched at the manifest's step boundaries, inside the model's diffusers pipeline.",
        epilog="examples:\n  atedm-compile run build/tiny-shapes --out out/image.png\n"
               "  atedm-compile run build/tiny-shapes --prompt \"a large red circle in the center on a plain white "
               "background\" --out out/circle.png")
    run.add_argument("directory", help="a directory made by `atedm-compile build`")
    run.add_argument("--prompt", type=utf8_text, default="a small red triangle at the top left on a striped blue "
                                                         "background", help="what to draw")
    run.add_argument("--steps", type=step_count, default=None,
                     help=f"sampling steps, 1 to {MAX_STEPS} (default: the built count)")
    run.add_argument("--height", type=positive_int, default=None, help="image height (default: the built height)")
    run.add_argument("--width", type=positive_int, default=None,
                     help="image width (default: --height where given, else the built width)")
    run.add_argument("--images", type=positive_int, default=None,
                     help="images per prompt (default: what the built batch fits)")
    run.add_argument("--guidance", type=guidance_scale, default=5.0,
                     help="classifier-free guidance scale, 0 to 100 (1 or less: no guidance, half the U-Net batch)")
    run.add_argument("--seed", type=seed_int, default=0, help="seed of the initial noise")
    run.add_argument("--backend", default=None, choices=list(BACKENDS), help="default: the built backend")
    run.add_argument("--providers", nargs="+", default=None,
                     help="ONNX Runtime providers: cpu, cuda, tensorrt or full names (default: cuda where present, "
                          "else cpu)")
    run.add_argument("--fallback-pytorch", action="store_true",
                     help="on a step count or shape the build does not cover, warn and run the PyTorch runner")
    run.add_argument("--out", default="out/image.png", help="PNG to write (more images: numbered, image-0.png ...)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check", help="verify a build: hashes, ONNX checker, TensorRT lint, TensorRT vs ORT",
        formatter_class=HelpFormatter,
        description="Verify a build directory: the manifest's form and meaning, every artefact's sha256, the ONNX "
                    "checker, a TensorRT-compatibility lint and, where TensorRT is installed, TensorRT against ONNX "
                    "Runtime. Exit status 0 when all pass, 1 when a check fails, 2 when the build is unusable.",
        epilog="example:\n  atedm-compile check build/tiny-shapes")
    check.add_argument("directory", help="a directory made by `atedm-compile build`")
    check.add_argument("--no-engines", "--no-tensorrt", dest="no_engines", action="store_true",
                       help="skip comparing the backend's engines (TensorRT's) with ONNX Runtime")
    check.set_defaults(func=cmd_check)


def cmd_build(args) -> int:
    from ..arguments import check_output, pruning_config
    from .build import BuildConfig, build

    require_extra("onnx", "build", modules=EXTRAS["onnx"] + (("onnxscript",) if args.exporter == "dynamo" else ()))
    check_output(Path(args.out), folder=True)
    config = BuildConfig(
        model=args.model, schedule=args.schedule, num_steps=args.steps, keep_ratio=args.keep_ratio,
        prune_less_blocks=args.prune_less_blocks, pruning=pruning_config(args), height=args.height,
        width=args.width, batch=args.batch, precision=args.precision, backend=args.backend, exporter=args.exporter,
        opset=args.opset, seed=args.seed, optimization_level=args.optimization_level, verify=args.verify,
        cache=_cache_config(args),
    )
    started = time.perf_counter()
    out = Path(args.out)
    try:
        manifest, records = build(config, args.out)
    except KeyboardInterrupt:
        if (out / MANIFEST).exists():
            raise KeyboardInterrupt(f"{out} holds a partial build; the same command resumes it") from None
        raise
    ran = sum(r.ran for r in records)
    print(f"{out}: {len(manifest.phases)} phases, {ran} of {len(records)} build stages ran, "
          f"{time.perf_counter() - started:.1f} s")
    for phase in manifest.phases:
        role = f" ({phase.role} steps)" if phase.role else ""
        print(f"  {phase.name}{role}: steps {phase.start}-{phase.stop - 1}, {phase.onnx.file} {phase.onnx.bytes} bytes"
              + (f", {phase.engine.file} {phase.engine.bytes} bytes" if phase.engine else ""))
    if manifest.weights:
        print(f"  shared weights: {manifest.weights.file} {manifest.weights.bytes} bytes")
    return 0


def _cache_config(args):
    """The build's ``DeepCacheConfig`` from ``--cache-*`` (None without ``--cache-interval``)."""
    from ..config import DeepCacheConfig

    options = {name: getattr(args, f"cache_{name}") for name in ("interval", "branch", "spacing", "power", "center",
                                                                  "forecast")}
    given = {name: value for name, value in options.items() if value is not None}
    if "interval" not in given:
        if given:
            raise ValueError(f"{', '.join('--cache-' + name for name in given)} set without --cache-interval, which "
                             f"turns cached steps on")
        return None
    return DeepCacheConfig(**given)


def cmd_run(args) -> int:
    import torch

    from ..arguments import check_output, save_png
    from ..models import load_pipeline, pipeline_configs, refuse_non_finite, resolve_model
    from .build import model_identity
    from .manifest import read_manifest
    from .runtime import load, plan_run

    require_extra("onnx", "run")
    directory = Path(args.directory)
    out = Path(args.out)
    check_output(out, folder=False)
    manifest = read_manifest(directory)
    name = manifest.model["name"]
    if not resolve_model(name).has_pipeline:
        raise ValueError(f"{directory} was built from the bare U-Net config {name!r} (random weights, no text "
                         f"encoders or VAE): `run` needs a full pipeline, so build from 'tiny', a trained model or a "
                         f"pipeline directory")
    configs = pipeline_configs(name)
    request = plan_run(directory, manifest, steps=args.steps, height=args.height, width=args.width,
                       images=args.images, guidance=args.guidance, backend=args.backend, providers=args.providers,
                       fallback=args.fallback_pytorch, vae_config=configs[1] if configs else None)
    identity = {k: v for k, v in manifest.model.items() if k != "config"}
    if model_identity(name, manifest.model.get("seed", 0))[0] != identity:
        raise ValueError(f"the model {name!r} has changed since {directory} was built: rebuild it")
    pipe = load_pipeline(name, seed=manifest.model.get("seed", 0))
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    fallback = pipe.unet if args.fallback_pytorch else None
    unet = load(directory, backend=request.backend.name, providers=args.providers, fallback=fallback,
                on_mismatch="fallback" if fallback is not None else "error")
    unet.attach(pipe)
    timings: dict[str, list[float]] = {}
    started = {}
    unet.register_forward_pre_hook(lambda *_: started.__setitem__("t", time.perf_counter()))
    unet.register_forward_hook(lambda *_: timings.setdefault(_label(unet.calls[-1]), []).append(
        time.perf_counter() - started["t"]))
    generator = torch.Generator().manual_seed(args.seed)
    made = pipe(args.prompt, num_inference_steps=request.steps, height=request.height, width=request.width,
                guidance_scale=args.guidance, num_images_per_prompt=request.images, generator=generator,
                callback_on_step_end=refuse_non_finite).images
    print(f"{directory}: {request.steps} steps at {request.width}x{request.height}, backend {request.backend.name}")
    for phase, seconds in timings.items():
        calls = [c.step for c in unet.calls if _label(c) == phase]
        print(f"  {phase}: steps {min(calls)}-{max(calls)}, {len(calls)} calls, "
              f"{sum(seconds) / len(seconds):.4f} s per call")
    # Every image the batch made: OUT itself for one, OUT's name numbered (image-0.png, ...) for more.
    files = [out] if len(made) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(made))]
    for image, file in zip(made, files):
        save_png(image, file)
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def _label(call) -> str:
    return call.phase if call.role == "full" else f"{call.phase} ({call.role})"


def cmd_check(args) -> int:
    from .check import check

    require_extra("onnx", "check", modules=("onnx",))

    report = check(args.directory, compare_engines=not args.no_engines)
    print("check passed" if report.ok else "check FAILED")
    return 0 if report.ok else 1


__all__ = ["add_export_commands"]
