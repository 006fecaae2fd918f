"""``atedm-compile evaluate`` (added to the main parser by ``add_evaluate_command``)."""

from __future__ import annotations

import sys

from ..devices import DTYPES
from .metrics import CLIP_MODEL, CLIP_PRETRAINED
from .plan import METHODS


EXAMPLES = """examples:
  atedm-compile evaluate --model PATH --captions captions_val2017.json --methods full atedm default tome \\
      --budgets 4.1 3.6 --guidance 5 7 --images 5000 --reference val2017/ --out eval/sdxl
  torchrun --nproc_per_node 8 -m atedm_compile.cli evaluate --model PATH --captions captions.txt --out eval/sdxl"""


def add_evaluate_command(sub) -> None:
    """Add ``evaluate`` to the ``atedm-compile`` subparsers."""
    from ..arguments import HelpFormatter, guidance_scale, positive_float, positive_int, seed_int, step_count
    from ..config import MAX_STEPS

    evaluate = sub.add_parser(
        "evaluate", help="FID and CLIP score of each method at matched FLOPs budgets (runs under torchrun too)",
        formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="Generate images of each method, budget and guidance scale (one seed per caption, the same "
                    "noise for every method) and measure FID (clean-fid) and the CLIP score (OpenCLIP ViT-g-14). "
                    "Under `torchrun --nproc_per_node K` the ranks share the captions; a rerun resumes.")
    evaluate.add_argument("--model", required=True,
                          help="a diffusers pipeline folder or cached hub id, or a shipped model: 'tiny-shapes' (64 px), 'tiny-shapes-xl' (128 px)")
    evaluate.add_argument("--captions", required=True,
                          help="a text file of one caption per line, or COCO captions_val2017.json (one caption per image)")
    evaluate.add_argument("--out", required=True, help="output folder; rerunning with the same settings resumes there")
    evaluate.add_argument("--methods", nargs="+", default=["full", "atedm", "default", "tome"], choices=list(METHODS),
                          metavar="METHOD", help=f"of {list(METHODS)}: 'atedm' is the paper's method, 'default' "
                               "the package's default pruning (DEFAULT_PRUNING)")
    evaluate.add_argument("--budgets", nargs="+", type=positive_float, default=[], metavar="TMACS",
                          help="TMACs of AT-EDM's all-pruned phase per U-Net call on the CFG pair (the paper's "
                               "labels: 4.1 is keep 0.37 on SD-XL); every other method gets the largest keep ratio "
                               "(default and random: at most AT-EDM's) whose schedule-average MACs, its own work "
                               "counted in, are at most AT-EDM's")
    evaluate.add_argument("--keep-ratios", nargs="+", type=positive_float, default=[], metavar="KEEP",
                          help="budgets given as AT-EDM's keep ratio instead")
    evaluate.add_argument("--guidance", nargs="+", type=guidance_scale, default=[7.0], metavar="CFG",
                          help="guidance scales, each in (0, 100]")
    evaluate.add_argument("--images", type=positive_int, default=None, help="the first N captions")
    evaluate.add_argument("--steps", type=step_count, default=50, help=f"sampling steps, 1 to {MAX_STEPS}")
    evaluate.add_argument("--seed", type=seed_int, default=0, help="caption i is sampled from seed + i")
    evaluate.add_argument("--batch", type=positive_int, default=4, help="images generated together")
    evaluate.add_argument("--height", type=positive_int, default=None, help="default: the model's own size")
    evaluate.add_argument("--width", type=positive_int, default=None, help="default: --height")
    evaluate.add_argument("--reference", default=None,
                          help="folder of real images for FID (e.g. COCO val2017), center-cropped and resized "
                               "to the generated size")
    evaluate.add_argument("--reference-stats", default=None,
                          help=".npz with mu and sigma of the reference features (e.g. reference.npz of an earlier run)")
    evaluate.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda")
    evaluate.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                          help="pipeline dtype (auto: fp16 on GPU, fp32 on CPU)")
    evaluate.add_argument("--inception", default=None,
                          help="clean-fid's inception-2015-12-05.pt (default: looked for in ~/.cache/clean-fid/, then /tmp/)")
    evaluate.add_argument("--clip-model", default=CLIP_MODEL, help="OpenCLIP model")
    evaluate.add_argument("--clip-pretrained", default=CLIP_PRETRAINED,
                          help="OpenCLIP pretrained tag, from the Hugging Face cache, or a weights file")
    evaluate.add_argument("--metrics", default=None, metavar="MODULE:FUNCTION",
                          help="other feature networks: a function (module:function or file.py:function) that "
                               "takes the device and returns an atedm_compile.evaluate.Metrics")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from .metrics import MissingMetricDependency, load_metrics, paper_metrics
    from .run import EvaluateConfig, evaluate

    config = EvaluateConfig(
        model=args.model, captions=args.captions, out=args.out, methods=args.methods, budgets=args.budgets,
        keep_ratios=args.keep_ratios, guidance=args.guidance, images=args.images, steps=args.steps, seed=args.seed,
        batch=args.batch, height=args.height, width=args.width, reference=args.reference,
        reference_stats=args.reference_stats, device=args.device, dtype=args.dtype,
    )
    if args.metrics:
        metrics = load_metrics(args.metrics)
    else:
        def metrics(device):
            return paper_metrics(device, args.inception, args.clip_model, args.clip_pretrained)
    try:
        evaluate(config, metrics)
    except MissingMetricDependency as error:
        print(f"atedm-compile evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0
