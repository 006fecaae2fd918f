"""DSAP: phases of sampling steps, each with a keep ratio per attention block.

A phase is data: a step range and an ordered list of (block selector, keep ratio) rules, later
rules winning. A schedule may also cache steps (DeepCache's rule, ``DeepCacheConfig``): across all
its phases, a step is then "full" (the whole U-Net, its deep features kept) or "cached" (the
shallow layers only, on the features of the last full step), pruned by its phase either way. A selector is a block name (``down1.F``), a module path
(``down_blocks.1.attentions.0``), a glob over names (``up*.L``, ``*``) or a feature level
(``level2``). Blocks no rule selects are unpruned (keep 1.0).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from .caching import step_roles
from .config import DeepCacheConfig, check_keep_ratio
from .tracing import BlockInfo

PRESETS = ("atedm", "atedm-level2", "atedm-dagger", "prune-more-early", "uniform", "none")
# atedm-level2: the level-2 blocks keep LEVEL2_FACTOR * sqrt(keep_ratio) of their tokens (at most all).
LEVEL2_FACTOR = 2.0
DOWN_POSITIONS = ("F", "L")
UP_POSITIONS = ("F", "M", "L")


@dataclass(frozen=True)
class Phase:
    name: str
    start: int
    stop: int
    rules: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"phase name {self.name!r} must be a non-empty string")
        for bound in ("start", "stop"):
            value = getattr(self, bound)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{bound}={value!r} of phase {self.name!r} must be an integer step index")
        for rule in self.rules:
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise ValueError(f"rule {rule!r} of phase {self.name!r} must be a (selector, keep ratio) pair")
            selector, keep = rule
            if not isinstance(selector, str) or not selector:
                raise ValueError(f"selector {selector!r} in phase {self.name!r} must be a non-empty string: a block "
                                 f"name (down1.F), a module path, a glob over names (up*.L) or a level (level2)")
            check_keep_ratio(keep, where=f"keep ratio of {selector!r} in phase {self.name!r}")

    @property
    def steps(self) -> range:
        return range(self.start, self.stop)

    def keep_ratios(self, blocks: list[BlockInfo]) -> dict[str, float]:
        """Block name -> keep ratio. Raises ValueError for a selector that matches no block."""
        ratios = {b.name: 1.0 for b in blocks}
        for selector, keep in self.rules:
            matched = select_blocks(blocks, selector)
            for block in matched:
                ratios[block.name] = keep
        return ratios


def select_blocks(blocks: list[BlockInfo], selector: str) -> list[BlockInfo]:
    if selector.startswith("level") and selector[5:].isdigit():
        matched = [b for b in blocks if b.level == int(selector[5:])]
    else:
        matched = [b for b in blocks if b.path == selector or fnmatch.fnmatchcase(b.name, selector)]
    if not matched:
        raise ValueError(
            f"unknown block {selector!r}; blocks are {[b.name for b in blocks]} "
            f"(or their module paths, a glob over names, or levelN)"
        )
    return matched


@dataclass(frozen=True)
class Schedule:
    """Phases covering steps ``0 .. num_steps - 1`` exactly once, in order."""

    phases: tuple[Phase, ...]
    num_steps: int
    name: str = "custom"
    cache: DeepCacheConfig | None = None

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps!r} must be an integer >= 1")
        if self.cache is not None and not isinstance(self.cache, DeepCacheConfig):
            raise ValueError(f"cache={self.cache!r} is not a DeepCacheConfig (or None: no cached steps)")
        names = [phase.name for phase in self.phases]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            # The runner, the manifest and the exported graphs find a phase by its name.
            raise ValueError(f"phase names {repeated} are used more than once in {names}: each phase needs its "
                             f"own name")
        expected = 0
        for phase in self.phases:
            if phase.start != expected or phase.stop <= phase.start:
                raise ValueError(
                    f"phase {phase.name!r} covers steps [{phase.start}, {phase.stop}); expected it to start at "
                    f"step {expected} and be non-empty: phases must cover 0..{self.num_steps - 1} in order"
                )
            expected = phase.stop
        if expected != self.num_steps:
            raise ValueError(f"the phases cover steps 0..{expected - 1}, but num_steps={self.num_steps}")

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if phase.start <= step < phase.stop:
                return phase
        raise ValueError(f"step {step} is outside this schedule's steps 0..{self.num_steps - 1}")

    def role_at(self, step: int) -> str:
        """``"full"`` or ``"cached"``: whether ``step`` runs the whole U-Net (every step without a
        cache) or only its shallow layers on the deep features of the last full step."""
        if self.cache is None:
            return "full"
        return step_roles(self.cache, self.num_steps)[step]

    def check_covers(self, num_inference_steps: int) -> None:
        if num_inference_steps != self.num_steps:
            raise ValueError(
                f"schedule {self.name!r} covers {self.num_steps} steps but sampling runs {num_inference_steps}; "
                f"build the schedule for {num_inference_steps} steps (make_schedule(..., num_steps={num_inference_steps}))"
            )


def _prune_less_rules(selection: str) -> tuple[tuple[str, float], ...]:
    parts = selection.upper().split("-")
    if len(parts) != 2 or parts[0] not in DOWN_POSITIONS or parts[1] not in UP_POSITIONS:
        raise ValueError(
            f"prune-less selection {selection!r} must be X-Y with X in {list(DOWN_POSITIONS)} (the block left "
            f"unpruned in each down stage) and Y in {list(UP_POSITIONS)} (in each up stage), e.g. 'F-L'"
        )
    return ((f"down*.{parts[0]}", 1.0), (f"up*.{parts[1]}", 1.0))


def level2_keep_ratio(keep_ratio: float) -> float:
    """The keep ratio of the level-2 blocks under the ``atedm-level2`` preset: ``min(1, 2 sqrt(keep))``.

    Why: on ``tiny-shapes-xl`` (SD-XL's topology: two layers per level-2 block, ten per level-3
    block) pruning level 2 cost nearly all of the fidelity at the 2.9 budget (level 2 alone at
    keep 0.085: 26.2 dB against the full model; level 3 alone: 35.8 dB), while a level-2 token
    costs a fifth of a level-3 one there (one layer after the pruning point instead of nine). At
    ToMe's MACs, shifting kept tokens to level 2 gained 6.6 to 7.4 dB at 2.9, 3.6 and 4.1 on the
    16 captions the factor was chosen on (1.6 and 2 tried, and fixed level-2 ratios 0.2 to 1.0),
    and 1.9 to 6.7 dB on three held-out settings of other captions, seeds, step counts and
    guidance (docs/quality.md, "Keep ratios per level").

    >>> level2_keep_ratio(0.04), level2_keep_ratio(0.25), level2_keep_ratio(0.37)
    (0.4, 1.0, 1.0)
    """
    return min(1.0, LEVEL2_FACTOR * math.sqrt(check_keep_ratio(keep_ratio)))


def make_schedule(
    preset: str = "atedm",
    num_steps: int = 50,
    keep_ratio: float = 0.37,
    prune_less_fraction: float = 0.3,
    prune_less_steps: int | None = None,
    prune_less_blocks: str = "F-L",
    cache: DeepCacheConfig | None = None,
) -> Schedule:
    """A preset schedule for ``num_steps`` sampling steps.

    Args:
        preset: ``atedm`` (DSAP: the first 30% of steps leave one block per stage unpruned, the
            rest prune every block), ``atedm-level2`` (ours: the same, the level-2 blocks keeping
            ``level2_keep_ratio(keep_ratio)`` = min(1, 2 sqrt(keep)) of their tokens, more than
            the others: the best per-level split measured at matched MACs), ``atedm-dagger`` (the
            same as ``atedm``, never pruning level 2),
            ``prune-more-early`` (supp. C.5; our reading: the prune-less phase moved to the last
            steps, so the total cost is the same), ``uniform`` (every step prunes every block) or
            ``none`` (nothing pruned).
        num_steps: sampling steps, 1 or more (distilled models use 1-4).
        keep_ratio: share of tokens kept in pruned blocks, in (0, 1]. Paper: 0.37.
        prune_less_fraction: share of steps in the prune-less phase, rounded half up (15 of 50).
        prune_less_steps: the same as a count; overrides the fraction.
        prune_less_blocks: which block of each down stage (F or L) and up stage (F, M or L) the
            prune-less phase leaves alone: ``F-L`` (paper's best, supp. C.3), ``F-M``, ``L-L``...
        cache: cached steps across all phases (``DeepCacheConfig``); None: every step is full.

    Example:
        >>> make_schedule("atedm", num_steps=50).phases[0].steps
        range(0, 15)
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown schedule preset {preset!r}; choose one of {list(PRESETS)}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    keep_ratio = check_keep_ratio(keep_ratio)
    if preset == "none":
        return Schedule((Phase("full", 0, num_steps),), num_steps, preset, cache)
    prune_all: tuple[tuple[str, float], ...] = (("*", keep_ratio),)
    if preset == "atedm-dagger":
        prune_all += (("level2", 1.0),)
    elif preset == "atedm-level2":
        prune_all += (("level2", level2_keep_ratio(keep_ratio)),)
    if preset == "uniform":
        return Schedule((Phase("pruned", 0, num_steps, prune_all),), num_steps, preset, cache)

    if prune_less_steps is None:
        if not 0.0 <= prune_less_fraction <= 1.0:
            raise ValueError(f"prune_less_fraction={prune_less_fraction!r} is outside [0, 1]")
        prune_less_steps = int(math.floor(prune_less_fraction * num_steps + 0.5))
    if not 0 <= prune_less_steps <= num_steps:
        raise ValueError(f"prune_less_steps={prune_less_steps!r} is outside [0, num_steps={num_steps}]")
    less = Phase("prune-less", 0, 0, prune_all + _prune_less_rules(prune_less_blocks))
    rest = Phase("pruned", 0, 0, prune_all)
    order = [rest, less] if preset == "prune-more-early" else [less, rest]
    lengths = [num_steps - prune_less_steps, prune_less_steps] if preset == "prune-more-early" else [
        prune_less_steps, num_steps - prune_less_steps]
    phases, start = [], 0
    for phase, length in zip(order, lengths):
        if length:
            phases.append(Phase(phase.name, start, start + length, phase.rules))
            start += length
    return Schedule(tuple(phases), num_steps, preset, cache)
