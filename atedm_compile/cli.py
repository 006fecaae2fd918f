"""``atedm-compile`` command line: ``flops`` and ``generate``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .config import DEFAULT_PRUNING, PRUNE_POINTS, RECOVERIES, SCORERS, SIMILARITIES, PruningConfig
from .schedule import PRESETS, make_schedule


def _add_pruning_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="atedm", choices=PRESETS, help="DSAP preset (default: atedm)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--keep-ratio", type=float, default=0.37, help="share of tokens kept in pruned blocks")
    parser.add_argument("--prune-less-blocks", default="F-L", help="blocks the prune-less phase leaves alone")
    parser.add_argument("--scorer", default="gwpr", choices=SCORERS)
    parser.add_argument("--iterations", type=int, default=PruningConfig.iterations, help="G-WPR rounds")
    parser.add_argument("--head-reduction", default="mean", choices=("mean", "rms"))
    parser.add_argument("--prune-point", default="after-ff", choices=PRUNE_POINTS)
    parser.add_argument("--recovery", default=DEFAULT_PRUNING.recovery, choices=RECOVERIES,
                        help="default: delta (ours); the paper's: --recovery similarity --similarity attention")
    parser.add_argument("--similarity", default=DEFAULT_PRUNING.similarity, choices=SIMILARITIES,
                        help="which kept token a pruned one takes from (default: key-cosine)")
    parser.add_argument("--neighbours", type=int, default=DEFAULT_PRUNING.neighbours,
                        help="delta recovery: how many most similar kept tokens give their update")


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
    args.height = args.height or unet.config.sample_size * factor
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


def _save_atomically(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".part")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_generate(args) -> int:
    import torch

    from .flops import count_phases
    from .models import build_unet, load_pipeline
    from .runner import apply, latent_multiple
    from .visualize import mask_sheet

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    vae_factor = getattr(pipe, "vae_scale_factor", 8)
    height = args.height or (256 if args.model == "tiny" else pipe.unet.config.sample_size * vae_factor)
    width = args.width or height
    multiple = latent_multiple(pipe.unet) * vae_factor
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} is not a positive multiple of {multiple} for this model")
    schedule = _schedule(args)
    config = _pruning_config(args)
    runner = apply(pipe, schedule, config)

    timings: list[tuple[str, float]] = []
    started = {}
    pipe.unet.register_forward_pre_hook(lambda *_: started.__setitem__("t", time.perf_counter()))
    pipe.unet.register_forward_hook(
        lambda *_: timings.append((runner.phase.name, time.perf_counter() - started["t"])))

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

    out = Path(args.out)
    _save_atomically(image, out / "image.png")
    levels = {b.name: b.level for b in runner.blocks}
    latent = (height // vae_factor, width // vae_factor)
    if kept:
        _save_atomically(mask_sheet(image, kept, latent, levels), out / "masks.png")
        print(f"wrote {out / 'image.png'} and {out / 'masks.png'} (kept tokens of the last step)")
    else:
        print(f"wrote {out / 'image.png'} (no block was pruned in the last step: no masks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atedm-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    flops = sub.add_parser("flops", help="FLOPs per phase of a schedule, on the meta device")
    flops.add_argument("--model", default="sdxl-base",
                       help="config name: sdxl-base, sdxl-turbo, sd15, sd21, tiny, tiny-sd15, tiny-shapes")
    flops.add_argument("--height", type=int, default=None, help="default: the model's own image size")
    flops.add_argument("--width", type=int, default=None, help="default: --height")
    flops.add_argument("--json", action="store_true", help="print a JSON object")
    flops.add_argument("--target-tflops", type=float, help="solve for the keep ratio meeting this average budget")
    _add_pruning_options(flops)
    flops.set_defaults(func=cmd_flops)

    generate = sub.add_parser("generate", help="sample an image with the AT-EDM runner")
    generate.add_argument("--model", default="tiny-shapes",
                          help="'tiny-shapes' (shipped, trained on synthetic shapes, 64 px), 'tiny' (built in, "
                               "random weights) or a path / hub id")
    generate.add_argument("--prompt", default="a small red triangle at the top left on a striped blue background")
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--guidance", type=float, default=5.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", default="out", help="folder for image.png and masks.png")
    _add_pruning_options(generate)
    generate.set_defaults(func=cmd_generate)

    from .export.cli import add_export_commands

    add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image backends this tool never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:
        # OSError: an output path that is a file, a folder we may not write, a full disk.
        print(f"atedm-compile {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
