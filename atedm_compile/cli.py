"""AT-EDM attention-driven token pruning for diffusers U-Nets: count the FLOPs of a schedule
(flops), sample with the pruning runner (generate), export one ONNX graph (and TensorRT engine)
per schedule phase (build), sample with such a build (run) and verify it (check)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_PRUNING, MAX_ITERATIONS, PRUNE_POINTS, RECOVERIES, SCORERS, SIMILARITIES, PruningConfig
from .schedule import PRESETS, make_schedule

EXAMPLES = """examples:
  atedm-compile generate --out out                      # the shipped tiny-shapes model: out/image.png, out/masks.png
  atedm-compile generate --model tiny --steps 20 --keep-ratio 0.5 --out out/tiny
  atedm-compile flops --model sdxl-base --schedule atedm --json
  atedm-compile build --model tiny-shapes --steps 20 --out build/tiny-shapes
  atedm-compile run build/tiny-shapes --prompt "a large red circle in the center on a plain white background" \\
      --out out/image.png
  atedm-compile check build/tiny-shapes

Each command has its own --help."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it has none to show (None: "the model's own"),
    and keeps the lines of example paragraphs as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n\n".join(paragraph if paragraph.startswith("example") else super(HelpFormatter, self)._fill_text(
            paragraph, width, indent) for paragraph in text.split("\n\n"))


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def utf8_text(text: str) -> str:
    try:
        text.encode("utf-8")  # bytes that were not UTF-8 reach Python as lone surrogates
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8 text") from None
    return text


def _add_pruning_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="atedm", choices=PRESETS,
                        help="DSAP preset: atedm (prune-less first 30%% of steps), atedm-dagger (level 2 never "
                             "pruned), prune-more-early, uniform (every step prunes) or none")
    parser.add_argument("--steps", type=positive_int, default=50, help="sampling steps")
    parser.add_argument("--keep-ratio", type=float, default=0.37,
                        help="share of tokens kept in pruned blocks, in (0, 1]")
    parser.add_argument("--prune-less-blocks", default="F-L",
                        help="blocks the prune-less phase leaves alone: X-Y, X in F/L (down stages), Y in F/M/L (up)")
    parser.add_argument("--scorer", default="gwpr", choices=SCORERS,
                        help="token scores: gwpr (self-attention G-WPR), ca-* (cross-attention) or random")
    parser.add_argument("--iterations", type=positive_int, default=PruningConfig.iterations,
                        help=f"G-WPR rounds, 1 to {MAX_ITERATIONS}")
    parser.add_argument("--head-reduction", default="mean", choices=("mean", "rms"),
                        help="how the attention heads are combined before scoring")
    parser.add_argument("--prune-point", default="after-ff", choices=PRUNE_POINTS,
                        help="prune after the first layer's feed-forward (paper) or before it")
    parser.add_argument("--recovery", default=DEFAULT_PRUNING.recovery, choices=RECOVERIES,
                        help="how pruned tokens get a value back before proj_out: delta (ours, the default) or "
                             "the paper's: --recovery similarity --similarity attention")
    parser.add_argument("--similarity", default=DEFAULT_PRUNING.similarity, choices=SIMILARITIES,
                        help="which kept token a pruned one takes from: by key cosine or by the first layer's "
                             "attention map")
    parser.add_argument("--neighbours", type=positive_int, default=DEFAULT_PRUNING.neighbours,
                        help="delta recovery: how many most similar kept tokens give their update (1 to 64)")


def check_output(path: Path, folder: bool) -> None:
    """ValueError unless ``path`` can be written as a folder (``folder``) or a PNG file, checked
    before any model is loaded; nothing is created."""
    path = Path(path)
    what = "folder" if folder else "file"
    if not folder and path.suffix.lower() != ".png":
        raise ValueError(f"--out {path} must name a .png file")
    if path.exists():
        if folder and not path.is_dir():
            raise ValueError(f"--out {path} exists and is not a folder")
        if not folder and path.is_dir():
            raise ValueError(f"--out {path} is a folder; give the image file's name (e.g. {path / 'image.png'})")
        target = path if folder else path.parent
    else:
        target = path.parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise ValueError(f"--out {path}: {target} is not a folder, so the output {what} cannot be made there")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {target} is not writable")


def _pruning_config(args) -> PruningConfig:
    return PruningConfig(
        scorer=args.scorer,
        iterations=args.iterations,
        head_reduction=args.head_reduction,
        prune_point=args.prune_point,
        recovery=args.recovery,
        similarity=args.similarity,
        neighbours=args.neighbours,
    )


def _schedule(args, keep_ratio=None):
    return make_schedule(
        args.schedule, args.steps, keep_ratio=args.keep_ratio if keep_ratio is None else keep_ratio,
        prune_less_blocks=args.prune_less_blocks,
    )


def _sig(value: float) -> float:
    """Six significant digits: enough for SD-XL's TMACs and for a tiny model's."""
    return float(f"{value:.6g}")


def _print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def cmd_flops(args) -> int:
    from .flops import count_phases, solve_keep_ratio
    from .models import build_unet, vae_factor

    unet = build_unet(args.model, device="meta")
    factor = vae_factor(args.model)
    # Default: the model's own size (SD-XL 1024, SD 1.5 512, tiny 256, tiny-shapes 64 px).
    args.height = args.height or unet.config.sample_size * factor  # 0 never gets here: positive_int
    args.width = args.width or args.height
    config = _pruning_config(args)
    keep = args.keep_ratio
    if args.target_tflops is not None:
        keep, report = solve_keep_ratio(
            unet, args.target_tflops, args.schedule, args.steps, config, args.height, args.width,
            vae_factor=factor, prune_less_blocks=args.prune_less_blocks,
        )
    else:
        report = count_phases(unet, _schedule(args), config, args.height, args.width, vae_factor=factor,
                              model_name=args.model)
    report.model = args.model
    if args.json:
        out = {
            "model": args.model,
            "schedule": args.schedule,
            "steps": args.steps,
            "height": args.height,
            "width": args.width,
            "keep_ratio": keep,
            "unit": "TMACs of one U-Net call on the CFG pair (FLOPs / 2 / 1e12, batch 2)",
            "full_tmacs": _sig(report.full_tmacs),
            "average_tmacs": _sig(report.average_tmacs),
            "average_tmacs_with_scoring": _sig(report.average_tmacs_with_scoring),
            "phases": {
                p.name: {
                    "steps": list(p.steps),
                    "tmacs": _sig(p.tmacs),
                    "tmacs_with_scoring": _sig(p.tmacs_with_scoring),
                    "flops": p.flops,
                    "flops_with_scoring": p.flops_with_scoring,
                    "blocks": {b.name: {"keep_ratio": b.keep_ratio, "tmacs": _sig(b.tmacs),
                                        "scoring_tmacs": _sig(b.scoring_tmacs)} for b in p.blocks},
                }
                for p in report.phases
            },
        }
        if args.target_tflops is not None:
            out["target_tmacs"] = args.target_tflops
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model} at {args.height}x{args.width}, schedule {args.schedule}, keep ratio {keep}, "
          f"{args.steps} steps. TMACs of one U-Net call on the CFG pair.")
    rows = [["full model", f"0-{args.steps - 1}", f"{report.full_tmacs:.4g}", f"{report.full_tmacs:.4g}"]]
    rows += [[p.name, f"{p.steps[0]}-{p.steps[1] - 1}", f"{p.tmacs:.4g}", f"{p.tmacs_with_scoring:.4g}"]
             for p in report.phases]
    rows.append(["average per step", "", f"{report.average_tmacs:.4g}", f"{report.average_tmacs_with_scoring:.4g}"])
    _print_table(["phase", "steps", "TMACs", "TMACs with scoring"], rows)
    if args.target_tflops is not None:
        print(f"keep ratio for an average of at most {args.target_tflops} TMACs per step: {keep}")
    return 0


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG atomically (never a half-written file), making its folder."""
    import io

    from .export.manifest import write_atomically

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())


def image_size(height: int | None, width: int | None, unet_config: dict, vae_config: dict | None, images: int,
               pruned: bool, device: str = "cpu") -> tuple[int, int, int]:
    """(height, width, VAE factor) of a sampling run: the model's own size by default (width:
    the height), checked against the U-Net's size multiple and the memory the run needs."""
    from .memory import check_fits, sampling_bytes

    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8
    height = height or unet_config["sample_size"] * factor
    width = width or height
    multiple = 2 ** (len(unet_config["down_block_types"]) - 1) * factor
    if height % multiple or width % multiple:
        raise ValueError(f"image size {width}x{height} is not a positive multiple of {multiple} for this model")
    check_fits(sampling_bytes(unet_config, vae_config, images, 2 * images, height, width, factor, pruned), device,
               f"sampling {images} image{'s' * (images > 1)} of {width}x{height} px")
    return height, width, factor


def cmd_generate(args) -> int:
    import torch

    from .devices import DTYPES, resolve_device, synchronize
    from .flops import count_phases
    from .memory import prunes
    from .models import build_unet, load_pipeline, pipeline_configs
    from .runner import apply
    from .visualize import mask_sheet

    out = Path(args.out)
    check_output(out, folder=True)
    device = resolve_device(args.device)
    schedule = _schedule(args)
    config = _pruning_config(args)
    configs = pipeline_configs(args.model)  # None for a hub id: known only once loaded
    if configs is not None:
        image_size(args.height, args.width, *configs, images=1, pruned=prunes(schedule.phases))
    pipe = load_pipeline(args.model, DTYPES[args.dtype], device)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    height, width, vae_factor = image_size(args.height, args.width, dict(pipe.unet.config), dict(pipe.vae.config),
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
    with runner.capture_kept_tokens() as kept:
        image = pipe(args.prompt, num_inference_steps=args.steps, height=height, width=width,
                     guidance_scale=args.guidance, generator=generator).images[0]

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
        print(f"wrote {out / 'image.png'} (no block was pruned in the last step: no masks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
                       help="config name: sdxl-base, sdxl-turbo, sd15, sd21, tiny, tiny-sd15, tiny-shapes")
    flops.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the "
                                                                         "model's own image size)")
    flops.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: --height)")
    flops.add_argument("--json", action="store_true", help="print a JSON object")
    flops.add_argument("--target-tflops", type=positive_float,
                       help="solve for the largest keep ratio whose schedule average is at most this many TMACs")
    _add_pruning_options(flops)
    flops.set_defaults(func=cmd_flops)

    generate = sub.add_parser(
        "generate", help="sample an image with the AT-EDM runner", formatter_class=HelpFormatter,
        description="Sample one image with the AT-EDM runner and write OUT/image.png and OUT/masks.png (the kept "
                    "tokens of every pruned block in the last step), with a table of TMACs and seconds per phase.",
        epilog="examples:\n  atedm-compile generate --out out\n"
               "  atedm-compile generate --model tiny --steps 20 --schedule uniform --keep-ratio 0.5 --out out/tiny")
    generate.add_argument("--model", default="tiny-shapes",
                          help="'tiny-shapes' (shipped, trained on synthetic shapes, 64 px), 'tiny' (built in, "
                               "random weights) or a path / hub id")
    generate.add_argument("--prompt", type=utf8_text,
                          default="a small red triangle at the top left on a striped blue background",
                          help="what to draw")
    generate.add_argument("--height", type=positive_int, default=None,
                          help="image height in pixels (default: the model's own size)")
    generate.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: --height)")
    generate.add_argument("--guidance", type=finite_float, default=5.0,
                          help="classifier-free guidance scale (1 or less: no guidance)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    generate.add_argument("--out", default="out", help="folder for image.png and masks.png")
    generate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    generate.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                          help="weights and activations (default: fp32; fp16 is slow on a CPU)")
    _add_pruning_options(generate)
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
    from .export.extras import UnavailableError

    try:
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
