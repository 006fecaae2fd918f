"""Choosing a schedule for a speed-up: DeepCache's cached steps (interval, branch) and AT-EDM's
pruning (keep ratio, prune-less steps, level-2 blocks spared on the first steps), searched together.

``plans`` spans the joint space, ``plan_cost`` counts a plan's MACs (pruned full steps and cached
steps, each with the work of its own phase), ``front`` keeps the plans that nothing beats on both
speed and quality, and ``choose`` picks the closest to the full model at a target speed-up. What
"quality" is (PSNR against the full model, a Frechet distance) and how the speed-up is measured
(FLOPs, or CPU time) is the caller's: ``benchmarks/front.py`` measures both on a trained model.

Example:
    >>> from atedm_compile.models import build_unet
    >>> unet = build_unet("tiny", device="meta")
    >>> full = plan_cost(unet, Plan(), 10, height=256, width=256)
    >>> cached = plan_cost(unet, Plan(interval=2), 10, height=256, width=256)
    >>> pruned = plan_cost(unet, Plan(keep_ratio=0.37, interval=2), 10, height=256, width=256)
    >>> full > cached > pruned
    True
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import torch

from .caching import cached_forward, features_shape, full_forward, step_roles
from .config import DEFAULT_PRUNING, DeepCacheConfig, PruningConfig
from .flops import _count, unet_inputs
from .runner import apply, remove, runner_of
from .schedule import Phase, Schedule, _prune_less_rules, check_keep_ratio, level2_keep_ratio

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """One point of the joint space.

    Args:
        keep_ratio: share of tokens pruned blocks keep; 1: nothing pruned.
        prune_less: share of the steps, from the first, in which one block per stage (F-L) stays
            unpruned (DSAP; the paper's 0.3).
        level2_spared: share of the steps, from the first, in which the level-2 blocks (SD-XL's
            highest-resolution attention) stay unpruned.
        level2_keep: the keep ratio of the level-2 blocks where they are pruned; None: ``keep_ratio``.
            ``schedule.level2_keep_ratio(keep_ratio)`` is the ``atedm-level2`` preset's.
        forecast: what cached steps read (``DeepCacheConfig.forecast``): ``none`` or ``linear``.
        interval: steps per full U-Net step (DeepCache); 1: every step is full.
        branch: the skip branch cached steps run above (``DeepCacheConfig.branch``).
    """

    keep_ratio: float = 1.0
    prune_less: float = 0.0
    level2_spared: float = 0.0
    interval: int = 1
    branch: int = 0
    level2_keep: float | None = None
    forecast: str = "none"

    def __post_init__(self):
        check_keep_ratio(self.keep_ratio)
        if self.level2_keep is not None:
            check_keep_ratio(self.level2_keep, where="level2_keep")
        for name in ("prune_less", "level2_spared"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} is outside [0, 1] (a share of the steps)")
        DeepCacheConfig(interval=self.interval, branch=self.branch, forecast=self.forecast)  # checks all three

    @property
    def cache(self) -> DeepCacheConfig | None:
        if self.interval == 1:
            return None
        return DeepCacheConfig(interval=self.interval, branch=self.branch, forecast=self.forecast)

    @property
    def label(self) -> str:
        parts = []
        if self.keep_ratio < 1:
            parts.append(f"keep {self.keep_ratio:g}")
            if self.prune_less:
                parts.append(f"prune-less {self.prune_less:g}")
            if self.level2_keep is not None:
                parts.append(f"level 2 keep {self.level2_keep:.2g}")
            if self.level2_spared:
                parts.append(f"level 2 spared {self.level2_spared:g}")
        if self.interval > 1:
            parts.append(f"cache {self.interval}/{self.branch}" + (f" {self.forecast}" if self.forecast != "none" else ""))
        return ", ".join(parts) or "full"

    def schedule(self, num_steps: int) -> Schedule:
        """The schedule of this plan for a ``num_steps``-step run: a phase per run of steps with
        the same blocks unpruned (at most three), all sharing the cached steps."""
        if self.keep_ratio >= 1:
            return Schedule((Phase("full", 0, num_steps),), num_steps, "none", self.cache)
        less = int(math.floor(self.prune_less * num_steps + 0.5))
        spared = int(math.floor(self.level2_spared * num_steps + 0.5))
        prune_all = (("*", self.keep_ratio),)
        if self.level2_keep is not None:
            prune_all += (("level2", self.level2_keep),)
        phases, cuts = [], sorted({0, less, spared, num_steps})
        for start, stop in zip(cuts[:-1], cuts[1:]):
            rules, name = prune_all, []
            if start < less:
                rules, name = rules + _prune_less_rules("F-L"), name + ["prune-less"]
            if start < spared:
                rules, name = rules + (("level2", 1.0),), name + ["level2-spared"]
            phases.append(Phase("+".join(name) or "pruned", start, stop, rules))
        return Schedule(tuple(phases), num_steps, "plan", self.cache)


def plans(
    keep_ratios: Iterable[float] = (1.0, 0.7, 0.5, 0.37, 0.25),
    prune_less: Iterable[float] = (0.0, 0.3),
    level2_spared: Iterable[float] = (0.0,),
    intervals: Iterable[int] = (1, 2, 3, 4, 5),
    branches: Iterable[int] = (0,),
    level2_rule: Iterable[bool] = (False, True),
    forecasts: Iterable[str] = ("none", "linear"),
) -> list[Plan]:
    """Every combination, without repeats: an unpruned plan has no prune-less or spared steps, and
    an uncached plan no branch. ``level2_rule``: with True, the level-2 blocks keep
    ``level2_keep_ratio(keep)`` (the ``atedm-level2`` preset's split; the best measured at matched
    MACs), with False the plan's one keep ratio. An uncached plan has no forecast."""
    found = {}
    for keep, less, spared, interval, branch, rule, forecast in itertools.product(
            keep_ratios, prune_less, level2_spared, intervals, branches, level2_rule, forecasts):
        if keep >= 1:
            less, spared, rule = 0.0, 0.0, False
        if interval == 1:
            branch, forecast = 0, "none"
        plan = Plan(keep, less, spared, interval, branch, level2_keep_ratio(keep) if rule else None, forecast)
        found[plan] = None
    return list(found)


def plan_cost(
    unet,
    plan: Plan,
    num_steps: int,
    config: PruningConfig | None = None,
    height: int = 1024,
    width: int = 1024,
    vae_factor: int = 8,
) -> float:
    """Average MACs (in TMACs, CFG pair, the method's own work counted in) of one step of a
    ``num_steps``-step run under ``plan``: every full step at its phase's pruning, every cached step
    running its phase's shallow blocks only. ``unet`` is best on the meta device; it is left as it was."""
    device = next(unet.parameters()).device
    latent = (height // vae_factor, width // vae_factor)
    inputs = unet_inputs(unet, 2, *latent, device=device)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs.get("added_cond_kwargs"))
    schedule = plan.schedule(num_steps)
    cache = plan.cache
    roles = step_roles(cache, num_steps) if cache else ("full",) * num_steps
    features = torch.zeros(features_shape(unet.config, plan.branch, 2, *latent), device=device) if cache else None
    previous = runner_of(unet)
    remove(unet)
    runner = apply(unet, Schedule(schedule.phases, num_steps, schedule.name), config or DEFAULT_PRUNING)
    total = 0.0
    try:
        runner.start(num_steps)
        for phase in schedule.phases:
            runner.use_phase(phase.name)
            kinds = [roles[step] for step in phase.steps]
            if "full" in kinds:
                full, _ = _count(lambda: full_forward(unet, plan.branch, *args) if cache else unet(**inputs))
                total += full * kinds.count("full")
            if "cached" in kinds:
                cached, _ = _count(lambda: cached_forward(unet, plan.branch, features, *args))
                total += cached * kinds.count("cached")
    finally:
        remove(unet)
        if previous is not None:
            previous.install()
    return total / num_steps / 2e12


def front(items: Sequence[T], speed: Callable[[T], float], quality: Callable[[T], float]) -> list[T]:
    """The items no other item beats on both speed and quality (higher is better for both), by
    speed ascending: each is closer to the full model than every faster one."""
    best, kept = -math.inf, []
    for item in sorted(items, key=lambda i: (-speed(i), -quality(i))):
        if quality(item) > best:
            kept.append(item)
            best = quality(item)
    return kept[::-1]


def choose(items: Sequence[T], target: float, speed: Callable[[T], float], quality: Callable[[T], float]) -> T | None:
    """The item of highest quality among those at least ``target`` fast; None where none is."""
    fast = [item for item in items if speed(item) >= target]
    return max(fast, key=quality) if fast else None
