"""What the command-line tools (``atedm-compile`` and its ``build`` / ``run`` / ``check`` /
``evaluate`` commands) share: the help format, argument types, the pruning options and what they
make, and checked outputs."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import tempfile
from pathlib import Path

from .config import (DEFAULT_PRUNING, FILLS, MAX_CELL, MAX_GUIDANCE, MAX_ITERATIONS, MAX_STEPS, PRUNE_POINTS, RECOVERIES, SCORERS, SIMILARITIES,
                     PruningConfig)
from .files import temp_prefix
from .ops import HEAD_REDUCTIONS
from .schedule import PRESETS, Schedule, make_schedule

# The command line's schedule defaults are make_schedule's own.
SCHEDULE_DEFAULTS = {name: p.default for name, p in inspect.signature(make_schedule).parameters.items()}


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


def step_count(text: str) -> int:
    """argparse type: sampling steps, 1 to ``MAX_STEPS``."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{text!r} is more than the {MAX_STEPS} sampling steps taken (the "
                                         f"schedulers' training timesteps)")
    return value


def seed_int(text: str) -> int:
    """argparse type: an integer torch.Generator takes as a seed, [-2**63, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is outside the seeds a generator takes, [-2**63, 2**64)")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def guidance_scale(text: str) -> float:
    """argparse type: a guidance scale in [0, ``MAX_GUIDANCE``] (1 or less: no guidance)."""
    value = finite_float(text)
    if not 0 <= value <= MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"{text!r} is outside the guidance scales taken, [0, {MAX_GUIDANCE:g}]")
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


def add_pruning_options(parser: argparse.ArgumentParser) -> None:
    """The schedule and ``PruningConfig`` options that ``flops``, ``generate`` and ``build`` share,
    with the defaults of ``make_schedule`` and ``PruningConfig``."""
    parser.add_argument("--schedule", default=SCHEDULE_DEFAULTS["preset"], choices=PRESETS,
                        help="DSAP preset: atedm (prune-less first 30%% of steps), atedm-level2 (the same, level 2 "
                             "keeping min(1, 2 sqrt(keep)): best at a FLOPs budget), atedm-dagger (level 2 never "
                             "pruned), prune-more-early, uniform (every step prunes) or none")
    parser.add_argument("--steps", type=step_count, default=SCHEDULE_DEFAULTS["num_steps"],
                        help=f"sampling steps, 1 to {MAX_STEPS}")
    parser.add_argument("--keep-ratio", type=float, default=SCHEDULE_DEFAULTS["keep_ratio"],
                        help="share of tokens kept in pruned blocks, in (0, 1]")
    parser.add_argument("--prune-less-blocks", default=SCHEDULE_DEFAULTS["prune_less_blocks"],
                        help="blocks the prune-less phase leaves alone: X-Y, X in F/L (down stages), Y in F/M/L (up)")
    parser.add_argument("--scorer", default=DEFAULT_PRUNING.scorer, choices=SCORERS,
                        help="token scores: gwpr (self-attention G-WPR), ca-* (cross-attention) or random")
    parser.add_argument("--iterations", type=positive_int, default=DEFAULT_PRUNING.iterations,
                        help=f"G-WPR rounds, 1 to {MAX_ITERATIONS}")
    parser.add_argument("--head-reduction", default=DEFAULT_PRUNING.head_reduction, choices=HEAD_REDUCTIONS,
                        help="how the attention heads are combined before scoring")
    parser.add_argument("--prune-point", default=DEFAULT_PRUNING.prune_point, choices=PRUNE_POINTS,
                        help="prune after the first layer's feed-forward (paper) or before it")
    parser.add_argument("--recovery", default=DEFAULT_PRUNING.recovery, choices=RECOVERIES,
                        help="how pruned tokens get a value back before proj_out: delta (ours, the default) or "
                             "the paper's: --recovery similarity --similarity attention --cell 1")
    parser.add_argument("--similarity", default=DEFAULT_PRUNING.similarity, choices=SIMILARITIES,
                        help="which kept token a pruned one takes from: by key cosine or by the first layer's "
                             "attention map")
    parser.add_argument("--neighbours", type=positive_int, default=DEFAULT_PRUNING.neighbours,
                        help="delta recovery: how many most similar kept tokens give their update (1 to 64)")
    parser.add_argument("--cell", type=positive_int, default=DEFAULT_PRUNING.cell,
                        help=f"keep the best token of every CELL x CELL patch of tokens first, then the rest by "
                             f"score (1: by score alone, the paper's; at most {MAX_CELL})")
    parser.add_argument("--fill", default=None, choices=FILLS,
                        help="with --cell over 1, the kept tokens beyond one per patch: the highest scores, or the "
                             f"tokens least similar to the patch winners (default: {DEFAULT_PRUNING.fill} with --cell "
                             "over 1, score with --cell 1)")


def check_output(path: Path, folder: bool) -> None:
    """ValueError unless ``path`` can be written as a folder (``folder``) or a PNG file, checked
    before any model is loaded; nothing is created."""
    path = Path(path)
    what = "folder" if folder else "file"
    try:
        str(path).encode("utf-8")  # what is not UTF-8 cannot be printed in "wrote ..." once written
    except UnicodeEncodeError:
        raise ValueError(f"--out {str(path)!r} is not valid UTF-8") from None
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
    # A file made and removed: root passes os.access in /proc and /sys, which take no new files.
    try:
        handle, probe = tempfile.mkstemp(dir=target, prefix=temp_prefix("probe"))
    except OSError as error:
        raise ValueError(f"--out {path}: {target} takes no new files ({error.strerror})") from None
    os.close(handle)
    os.unlink(probe)


def pruning_config(args) -> PruningConfig:
    """The ``PruningConfig`` of parsed ``add_pruning_options`` arguments."""
    return PruningConfig(
        scorer=args.scorer,
        iterations=args.iterations,
        head_reduction=args.head_reduction,
        prune_point=args.prune_point,
        recovery=args.recovery,
        similarity=args.similarity,
        neighbours=args.neighbours,
        cell=args.cell,
        fill=args.fill or (DEFAULT_PRUNING.fill if args.cell > 1 else "score"),
    )


def schedule_of(args, keep_ratio=None) -> Schedule:
    """The schedule of parsed ``add_pruning_options`` arguments (at ``keep_ratio`` when given)."""
    return make_schedule(
        args.schedule, args.steps, keep_ratio=args.keep_ratio if keep_ratio is None else keep_ratio,
        prune_less_blocks=args.prune_less_blocks,
    )


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG atomically (never a half-written file), making its folder."""
    import io

    from .files import make_folder, remove_folders, write_atomically

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    made = make_folder(path.parent)
    try:
        write_atomically(path, buffer.getvalue())
    except BaseException:
        remove_folders(made)  # no empty output folder left by a full disk
        raise
