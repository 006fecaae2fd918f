"""AT-EDM attention-driven token pruning for diffusers U-Nets: count the FLOPs of a schedule
(flops), sample with the pruning runner (generate), export one ONNX graph (and TensorRT engine)
per schedule phase (build), sample with such a build (run) and verify it (check)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .arguments import (ArgumentParser, HelpFormatter, add_pruning_options, check_output, guidance_scale,
                        positive_float, positive_int, pruning_config, save_png, schedule_of, seed_int, utf8_text)

EXAMPLES = """examples:
  atedm-compile generate --out out                      # the shipped tiny-shapes model: out/image.png, out/masks.png
  atedm-compile generate --model tiny --steps 20 --keep-ratio 0.5 --out out/tiny
  atedm-compile flops --model sdxl-base --schedule atedm --json
  atedm-compile build --model tiny-shapes --steps 20 --out build/tiny-shapes
  atedm-compile run build/tiny-shapes --prompt "a large red circle in the center on a plain white background" \\
      --out out/image.png
  atedm-compile check build/tiny-shapes

Each command has its own --help."""


def _print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def cmd_flops(args) -> int:
    from .flops import count_phases, solve_keep_ratio
    from .models import build_unet, resolve_model
    from .sizes import sampling_size

    source = resolve_model(args.model)
    unet = build_unet(source.unet_config(), device="meta")
    # Default: the model's own size (SD-XL 1024, SD 1.5 512, tiny 256, tiny-shapes 64, tiny-shapes-xl 128 px).
    args.height, args.width, factor = sampling_size(unet.config, args.height, args.width,
                                                    vae_factor=source.vae_factor)
    config = pruning_config(args)
    keep = args.keep_ratio
    try:
        if args.target_tflops is not None:
            keep, report = solve_keep_ratio(
                unet, args.target_tflops, args.schedule, args.steps, config, args.height, args.width,
                vae_factor=factor, prune_less_blocks=args.prune_less_blocks,
            )
        else:
            report = count_phases(unet, schedule_of(args), config, args.height, args.width, vae_factor=factor,
                                  model_name=args.model)
    except RuntimeError as error:  # the meta device's sizes overflow int64 (an N x N map of 10^12 tokens)
        if "overflow" not in str(error):
            raise
        raise ValueError(f"image size {args.width}x{args.height} px is too large to count: a tensor of the U-Net's "
                         f"would hold more elements than 64-bit sizes allow") from None
    report.model = args.model
    if args.json:
        out = {"model": args.model, "schedule": args.schedule, "steps": args.steps, "height": args.height,
               "width": args.width, "keep_ratio": keep, **report.to_dict()}
        if args.target_tflops is not None:
            out["target_tmacs"] = args.target_tflops
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model} at {args.width}x{args.height} px, schedule {args.schedule}, keep ratio {keep}, "
          f"{args.steps} steps. TMACs of one U-Net call on the CFG pair.")
    rows = [["full model", f"0-{args.steps - 1}", f"{report.full_tmacs:.4g}", f"{report.full_tmacs:.4g}"]]
    rows += [[p.name, f"{p.steps[0]}-{p.steps[1] - 1}", f"{p.tmacs:.4g}", f"{p.tmacs_with_scoring:.4g}"]
             for p in report.phases]
    rows.append(["average per step", "", f"{report.average_tmacs:.4g}", f"{report.average_tmacs_with_scoring:.4g}"])
    _print_table(["phase", "steps", "TMACs", "TMACs with scoring"], rows)
    if args.target_tflops is not None:
        print(f"keep ratio for an average of at most {args.target_tflops} TMACs per step: {keep}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .devices import resolve_device, resolve_dtype, synchronize
    from .flops import count_phases
    from .memory import prunes
    from . import triton_map
    from .models import build_unet, load_pipeline, pipeline_configs, refuse_non_finite
    from .ops import attention_path
    from .runner import apply
    from .sizes import preflight
    from .visualize import mask_sheet

    out = Path(args.out)
    check_output(out, folder=True)
    device = resolve_device(args.device)
    if args.attention_map == "triton" and not triton_map.available(device):
        raise ValueError(f"--attention-map triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                         f"device here: {device}")
    schedule = schedule_of(args)
    config = pruning_config(args)
    configs = pipeline_configs(args.model)  # None for a hub id: known only once loaded
    if configs is not None:
        preflight(*configs, args.height, args.width, images=1, pruned=prunes(schedule.phases))
    pipe = load_pipeline(args.model, resolve_dtype(args.dtype), device)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    height, width, vae_factor = preflight(dict(pipe.unet.config), dict(pipe.vae.config), args.height, args.width,
                                          images=1, pruned=prunes(schedule.phases))
    runner = apply(pipe, schedule, config)

    timings: list[tuple[str, float]] = []
    started = {}

    # On a GPU the clock waits for the queued work, so that each span is one U-Net call's.
    def before_call(*_):
        synchronize(device)
        started["t"] = time.perf_counter()

    def after_call(*_):
        synchronize(device)
        timings.append((runner.phase.name, time.perf_counter() - started["t"]))

    pipe.unet.register_forward_pre_hook(before_call)
    pipe.unet.register_forward_hook(after_call)

    generator = torch.Generator().manual_seed(args.seed)
    with runner.capture_kept_tokens() as kept, attention_path(args.attention_map):
        image = pipe(args.prompt, num_inference_steps=args.steps, height=height, width=width,
                     guidance_scale=args.guidance, generator=generator,
                     callback_on_step_end=refuse_non_finite).images[0]

    cost = count_phases(build_unet(dict(pipe.unet.config), device="meta"), schedule, config, height, width,
                        vae_factor=vae_factor)
    rows = []
    for phase in cost.phases:
        seconds = [t for name, t in timings if name == phase.name]
        rows.append([phase.name, f"{phase.steps[0]}-{phase.steps[1] - 1}", f"{phase.tmacs:.4g}",
                     f"{sum(seconds) / max(1, len(seconds)):.4f}"])
    print(f"{args.model}: {args.steps} steps at {width}x{height}, schedule {schedule.name}, "
          f"full model {cost.full_tmacs:.4g} TMACs per step")
    _print_table(["phase", "steps", "TMACs", "seconds per step"], rows)

    save_png(image, out / "image.png")
    levels = {b.name: b.level for b in runner.blocks}
    latent = (height // vae_factor, width // vae_factor)
    if kept:
        save_png(mask_sheet(image, kept, latent, levels), out / "masks.png")
        print(f"wrote {out / 'image.png'} and {out / 'masks.png'} (kept tokens of the last step)")
    else:
        stale = (out / "masks.png").is_file()
        (out / "masks.png").unlink(missing_ok=True)  # an earlier run's masks would not be this image's
        print(f"wrote {out / 'image.png'} (no block was pruned in the last step: no masks"
              f"{'; removed the earlier masks.png' if stale else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .devices import DTYPES

    parser = ArgumentParser(prog="atedm-compile", description=__doc__, epilog=EXAMPLES,
                            formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flops = sub.add_parser(
        "flops", help="FLOPs per phase of a schedule, on the meta device", formatter_class=HelpFormatter,
        description="TMACs of one U-Net call on the CFG pair in each phase of a schedule, counted on the meta "
                    "device (no weights, no memory).",
        epilog="examples:\n  atedm-compile flops --model sdxl-base --schedule atedm --json\n"
               "  atedm-compile flops --model sdxl-base --target-tflops 4.1")
    flops.add_argument("--model", default="sdxl-base",
                       help="config name: sdxl-base, sdxl-turbo, sd15, sd21, tiny, tiny-sd15, tiny-shapes, tiny-shapes-xl")
    flops.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the "
                                                                         "model's own image size)")
    flops.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: --height)")
    flops.add_argument("--json", action="store_true", help="print a JSON object")
    flops.add_argument("--target-tflops", type=positive_float,
                       help="solve for the largest keep ratio whose schedule average is at most this many TMACs")
    add_pruning_options(flops)
    flops.set_defaults(func=cmd_flops)

    generate = sub.add_parser(
        "generate", help="sample an image with the AT-EDM runner", formatter_class=HelpFormatter,
        description="Sample one image with the AT-EDM runner and write OUT/image.png and OUT/masks.png (the kept "
                    "tokens of every pruned block in the last step), with a table of TMACs and seconds per phase.",
        epilog="examples:\n  atedm-compile generate --out out\n"
               "  atedm-compile generate --model tiny --steps 20 --schedule uniform --keep-ratio 0.5 --out out/tiny")
    generate.add_argument("--model", default="tiny-shapes",
                          help="'tiny-shapes' (shipped, trained on synthetic shapes, 64 px), 'tiny-shapes-xl' (shipped, "
                               "SD-XL's depth pattern, 128 px), 'tiny' (built in, random weights) or a path / hub id")
    generate.add_argument("--prompt", type=utf8_text,
                          default="a small red triangle at the top left on a striped blue background",
                          help="what to draw")
    generate.add_argument("--height", type=positive_int, default=None,
                          help="image height in pixels (default: the model's own size)")
    generate.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: --height)")
    generate.add_argument("--guidance", type=guidance_scale, default=5.0,
                          help="classifier-free guidance scale, 0 to 100 (1 or less: no guidance)")
    generate.add_argument("--seed", type=seed_int, default=0, help="seed of the initial noise")
    generate.add_argument("--out", default="out", help="folder for image.png and masks.png")
    generate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    generate.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                          help="weights and activations (fp16 is slow on a CPU)")
    generate.add_argument("--attention-map", default="auto", choices=("auto", "per-head", "chunked", "triton"),
                          help="how pruned blocks compute the first layer's attention map: auto (per-head on the "
                               "CPU, chunked on a GPU), or one forced; triton: one Triton kernel (CUDA, or the CPU "
                               "under TRITON_INTERPRET=1)")
    add_pruning_options(generate)
    generate.set_defaults(func=cmd_generate)

    from .export.cli import add_export_commands

    add_export_commands(sub)
    from .evaluate.cli import add_evaluate_command

    add_evaluate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends this tool never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from .export.extras import UnavailableError, set_aside_broken_torchvision

    set_aside_broken_torchvision()  # only `evaluate`'s metrics need it, and say so

    try:
        if getattr(args, "out", None) is not None:
            from .evaluate.shards import check_launch

            check_launch()
        return args.func(args)
    except (ValueError, OSError, UnavailableError) as error:
        # OSError: an output path that is a file, a folder we may not write, a full disk.
        print(f"atedm-compile {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        note = f": {interrupt}" if str(interrupt) else ""
        print(f"atedm-compile {args.command}: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
