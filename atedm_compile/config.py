"""How a pruned block scores, selects and recovers tokens (the same for every block and phase)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ops import HEAD_REDUCTIONS, RECOVERIES, SCORERS
from .roles import CROSS_ATTENTION_MAP

# SCORERS and RECOVERIES are the tables of ops.scoring and ops.recovery (name -> function and the
# graph inputs it reads): a name is allowed once it is there.
PRUNE_POINTS = ("after-ff", "before-ff")
SIMILARITIES = ("attention", "key-cosine")
FILLS = ("score", "distinct")


MAX_CELL = 16  # a patch of 16 x 16 tokens: past that the kept tokens are no longer spread out
MAX_ITERATIONS = 100  # G-WPR's ranking settles within a few rounds; more is a typo, not a setting
# Classifier-free guidance: the paper's scales are 5 to 8 and hardly anyone goes past 30; far
# beyond, the guided noise overflows and sampling makes a black or flat image.
MAX_GUIDANCE = 100.0
# Sampling steps: the schedulers are trained on 1000 timesteps, and every step costs a U-Net call;
# 10**12 steps would first need terabytes for the timestep table.
MAX_STEPS = 1000


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {list(allowed)}")


def check_number(field: str, value, low: float, high: float, integer: bool = False,
                 low_open: bool = False) -> None:
    """ValueError unless ``value`` is a finite (integer, if asked) number in [low, high] ((low, high]
    with ``low_open``), naming the field, the value and what is allowed."""
    kind = "an integer" if integer else "a number"
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if wrong_type or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high or (
            low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{field}={value!r} is not allowed: must be {kind} in {bounds}")


@dataclass(frozen=True)
class PruningConfig:
    """Args:
    scorer: ``gwpr`` (self-attention G-WPR, the paper's default), the cross-attention variants
        of supp. C.2 (``ca-entropy``, ``ca-hardclip``, ``ca-softclip``, ``ca-power``) or ``random``.
    iterations: rounds of s <- A^T s. Default 5 (our choice; the paper gives no number). The
        first round is the plain "attention received" score; later rounds weigh each vote by the
        voter's importance, and on row-stochastic maps the top of the ranking settles within a
        few rounds. Five rounds cost 0.0009 TMACs per SD-XL call, and the scoring-inclusive count
        with 4 or 5 rounds is what reproduces PAPER.md's reference figures (4.066 / 4.989 / 4.263).
    head_reduction: ``mean`` (AT-EDM) or ``rms`` (Zero-TPrune).
    prune_point: ``after-ff`` (paper default) or ``before-ff`` (ablation of supp. C.1).
    recovery: ``similarity`` (a pruned token copies the final value of its most similar kept
        token: the paper's method, and ``PruningConfig()``'s; ``apply`` and the CLI run
        ``DEFAULT_PRUNING``, delta by key cosine on patch winners and a distinct fill, when given no
        config), ``delta`` (ours: a pruned token keeps its own value from the pruning point and
        adds the update the later layers gave its most similar kept token, x_i = x_i(prune) + x_j(final) - x_j(prune)), ``layer-delta`` (ours: the same
        layer by layer, j matched again at every later layer by the cosine of the values entering
        it; ``similarity`` and ``neighbours`` do not apply), ``merge-delta`` (ours: the later
        layers run on each kept token's cluster mean, the tokens whose most similar kept token it
        is, and every token adds its cluster's update, x_i = x_i(prune) + x_j(final) - mean_j(prune))
        or the supp. A.6 baselines
        ``zeros``, ``interpolation``, ``direct-copy``.
    similarity: for ``similarity``, ``delta`` and ``merge-delta`` recovery: ``attention`` (the first layer's
        head-combined attention map A[i, j], the paper's, read from its figure) or ``key-cosine``.
    neighbours: for ``delta`` recovery: how many of the most similar kept tokens give their update,
        averaged with weights proportional to their similarity. Default 1 (the most similar one).
    cell: side, in tokens, of the patches of the token grid of which each keeps its best-scoring
        token before the remaining kept tokens are taken by score (ours: every pruned token then
        has a kept token next to it). Where there would be more patches than kept tokens, the
        patches grow until there are not (``ops.patch_side``). Default 1: plain top-k by score, the
        paper's.
    fill: with ``cell`` > 1, how the kept tokens beyond one per patch are chosen: ``score`` (the
        highest scores) or ``distinct`` (ours: the tokens least similar to every patch winner, by
        the cosine of their values at the pruning point: those a recovery from the winners would
        get most wrong).
    eta, alpha: thresholds of the clip and power cross-attention scorers (paper: 0.2, 5).
    seed: seed of the ``random`` scorer.
    """

    scorer: str = "gwpr"
    iterations: int = 5
    head_reduction: str = "mean"
    prune_point: str = "after-ff"
    recovery: str = "similarity"
    similarity: str = "attention"
    neighbours: int = 1
    cell: int = 1
    fill: str = "score"
    eta: float = 0.2
    alpha: float = 5.0
    seed: int = 0

    def __post_init__(self):
        _check_choice("scorer", self.scorer, SCORERS)
        _check_choice("head_reduction", self.head_reduction, HEAD_REDUCTIONS)
        _check_choice("prune_point", self.prune_point, PRUNE_POINTS)
        _check_choice("recovery", self.recovery, RECOVERIES)
        _check_choice("similarity", self.similarity, SIMILARITIES)
        check_number("iterations", self.iterations, 1, MAX_ITERATIONS, integer=True)
        check_number("eta", self.eta, 0.0, 1.0)  # a threshold on attention probabilities
        check_number("alpha", self.alpha, 0.0, 1e6, low_open=True)
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_number("neighbours", self.neighbours, 1, 64, integer=True)
        check_number("cell", self.cell, 1, MAX_CELL, integer=True)
        _check_choice("fill", self.fill, FILLS)
        if self.fill == "distinct" and self.cell == 1:
            raise ValueError("fill='distinct' picks tokens unlike the patch winners: it needs cell > 1 (try cell=2)")
        if self.neighbours > 1 and not RECOVERIES[self.recovery].neighbours:
            having = " or ".join(f"recovery={name!r}" for name, r in RECOVERIES.items() if r.neighbours)
            raise ValueError(f"neighbours={self.neighbours} averages the updates of several kept tokens: only "
                             f"{having} has them (recovery={self.recovery!r} would ignore it)")

    @property
    def uses_cross_attention(self) -> bool:
        return SCORERS[self.scorer].reads == CROSS_ATTENTION_MAP


# The package default: G-WPR scores, the best token of every 3 x 3 patch kept first and the rest
# of the kept tokens those least like them, and the ``merge-delta`` recovery by key cosine (the
# later layers run on the kept tokens' cluster means). On ``tiny-shapes-xl``, on two held-out
# settings, it beat ``delta`` by 3 dB at the 2.9 budget and was even with it on average at 3.6 and
# 4.1 (ahead on one setting, behind on the other); the paper's selection and copy it beats by far
# (docs/quality.md, "The aggressive budget"). At a FLOPs budget it is best on the ``atedm-level2``
# schedule (docs/quality.md, "Keep ratios per level"). ``PAPER_PRUNING`` is the paper's.
DEFAULT_PRUNING = PruningConfig(recovery="merge-delta", similarity="key-cosine", cell=3, fill="distinct")
# The paper's AT-EDM by name: G-WPR scores, top-k selection and the similarity copy by attention.
PAPER_PRUNING = PruningConfig()


def check_keep_ratio(keep_ratio, where: str = "keep_ratio") -> float:
    """A keep ratio must lie in (0, 1]; 1.0 means unpruned."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"{where}={keep_ratio!r} is outside (0, 1]: keep at least one token, at most all")
    return float(keep_ratio)


# -- DeepCache: steps that reuse the deep features of an earlier step ------------------------

CACHE_SPACINGS = ("uniform", "non-uniform")
CACHE_FORECASTS = ("none", "linear")
MAX_CACHE_INTERVAL = 1000  # one full step per 1000 is already past any scheduler's step count


@dataclass(frozen=True)
class DeepCacheConfig:
    """Which sampling steps run the whole U-Net and which reuse its deep features (DeepCache,
    Ma et al., CVPR 2024; the ``DeepCache`` package's ``DeepCacheSDHelper`` and pipelines).

    A full step runs the whole U-Net and keeps the input of the up-stage layer at ``branch``; a
    cached step runs only the layers above the branch (the down layers before it and the up
    layers from it on) and reads that kept feature instead of running the deep part.

    Args:
        interval: steps per full step: 1 runs every step in full, 2 every other step (the package's
            ``cache_interval``).
        branch: the skip branch, counted from the shallowest: block ``branch // (L + 1)`` of the
            down stages, layer ``branch % (L + 1)`` in it, for ``L`` = the U-Net's
            ``layers_per_block`` (layer ``L`` is the downsampler). With ``L`` = 2, every SD and
            SD-XL U-Net, that is the package's ``cache_branch_id`` (``// 3``, ``% 3``). Branch 0:
            only ``conv_in`` and the last up layer run in a cached step. Which branches a U-Net
            has is checked against it (``caching.branch_position``).
        spacing: ``uniform`` (steps 0, interval, 2 x interval... run in full: the helper's
            ``skip_mode="uniform"`` and the pipelines' ``uniform=True``) or ``non-uniform`` (the
            pipelines' ``uniform=False``: ceil(N / interval) full steps, denser around
            ``center``, placed by ``sample_from_quad_center`` with ``power``; the helper has no
            working non-uniform mode).
        power: exponent of the non-uniform spacing, > 1 (the package lowers it by 0.02 until the
            full steps are distinct). Our default 1.4; the package's pipelines have none.
        center: the step the non-uniform full steps crowd around. Our default 15; the package's
            pipelines have none. Must lie inside the run (checked with the step count).
        forecast: what a cached step reads: ``none`` (DeepCache's rule: the last full step's
            features as they are) or ``linear`` (ours, TaylorSeer's first order applied to the
            cached features: the line through the last two full steps' features, in timestep
            units, read at the cached step's timestep; the first cached steps of a run, after a
            single full step, read it as it is). No graph changes: the runner computes it between
            calls (three elementwise operations on the features).
    """

    interval: int = 2
    branch: int = 0
    spacing: str = "uniform"
    power: float = 1.4
    center: int = 15
    forecast: str = "none"

    def __post_init__(self):
        check_number("interval", self.interval, 1, MAX_CACHE_INTERVAL, integer=True)
        check_number("branch", self.branch, 0, 2**31 - 1, integer=True)
        _check_choice("spacing", self.spacing, CACHE_SPACINGS)
        check_number("power", self.power, 1.0, 100.0, low_open=True)
        check_number("center", self.center, 0, 2**31 - 1, integer=True)
        _check_choice("forecast", self.forecast, CACHE_FORECASTS)


# -- ToMe, the baseline (supp. B.1) ----------------------------------------------------------

SUBLAYERS = {"self-attention": "attn1", "cross-attention": "attn2", "ff": "ff"}
DESTINATIONS = ("random", "fixed")


@dataclass(frozen=True)
class ToMeConfig:
    """Args:
    ratio: share of a layer's tokens merged away, r = int(N * ratio) (tomesd's ``ratio``); at
        most 1 - 1 / (sx * sy), 0.75 with 2 x 2 cells. 0.5 is the paper's baseline at 4.1 TMACs.
    sublayers: where to merge, any of ``self-attention``, ``cross-attention``, ``ff`` (tomesd's
        ``merge_attn``, ``merge_crossattn``, ``merge_mlp``). Default: all three, the paper's baseline.
    destination: ``random`` (one token per cell drawn from ``seed``, the same draw at every call;
        tomesd's ``use_rand=True`` redraws at every call) or ``fixed`` (the top-left token of every
        cell, tomesd's ``use_rand=False``).
    seed: seed of the ``random`` destinations; layer i of a block draws from ``seed + i``.
    sx, sy: cell width and height in tokens.

    Every layer of every block it is applied to merges: tomesd's ``max_downsample`` is the choice
    of blocks, which belongs to the caller (the paper's baseline: all levels).
    """

    ratio: float = 0.5
    sublayers: tuple[str, ...] = ("self-attention", "cross-attention", "ff")
    destination: str = "random"
    seed: int = 0
    sx: int = 2
    sy: int = 2

    @property
    def lowest_keep(self) -> float:
        """The smallest keep ratio (1 - the largest merge ratio): each cell keeps its destination."""
        return 1.0 / (self.sx * self.sy)

    def __post_init__(self):
        for field in ("sx", "sy"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        check_merge_ratio(self.ratio, self.sx, self.sy)
        if not self.sublayers or any(s not in SUBLAYERS for s in self.sublayers):
            raise ValueError(f"sublayers={self.sublayers!r}: choose one or more of {list(SUBLAYERS)}")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"destination={self.destination!r} is not allowed; choose one of {list(DESTINATIONS)}")


# -- ToDo, a peer: keys and values from a downsampled grid ---------------------------------

DOWNSAMPLE_METHODS = ("nearest", "avg")
MAX_DOWNSAMPLE_FACTOR = 16  # as MAX_CELL: past 16 x 16 tokens per key the map says little


@dataclass(frozen=True)
class ToDoConfig:
    """ToDo (Smith et al. 2024, "Token Downsampling for Efficient Generation of High-Resolution
    Images"): the self-attention of every layer of a block takes its keys and values from a
    downsampled copy of the hidden states entering it; the queries, and so the output, stay at
    full resolution (nothing to unmerge).

    Args:
        factor: downsampling factor d of each side of the token grid, >= 1 (2: 4x fewer keys and
            values, the paper's). The key/value grid of an H x W block is floor(H / d) x floor(W / d).
        method: ``nearest`` (one token per d x d cell, the top-left one where d divides the sides: the
            paper's grid subsampling, found as good as averaging) or ``avg`` (the mean over each
            cell, torch's ``area`` interpolation).
        levels: how many of the U-Net's highest-resolution feature levels that have attention it
            applies to, counted from the first with attention (1: only that one, the paper's:
            level 1 of SD 1.5, level 2 of SD-XL). Blocks of other levels run unchanged.

    In a schedule, a block's keep ratio k is the share of keys and values kept: the block runs at
    factor 1 / sqrt(k) (k = 0.25: d = 2; k = 1 / 9: d = 3), so budgets and schedules serve ToDo as
    they serve pruning; ``factor`` is used where the pass is called without one, and
    ``keep_ratio`` gives the k of ``factor``.
    """

    factor: float = 2
    method: str = "nearest"
    levels: int = 1

    def __post_init__(self):
        check_number("factor", self.factor, 1, MAX_DOWNSAMPLE_FACTOR)
        _check_choice("method", self.method, DOWNSAMPLE_METHODS)
        check_number("levels", self.levels, 1, 64, integer=True)

    @property
    def keep_ratio(self) -> float:
        """The share of keys and values kept at ``factor``: the keep ratio a schedule gives for it."""
        return 1.0 / self.factor**2

    def applies_to(self, level: int, levels_with_attention) -> bool:
        """Whether a block of feature ``level`` downsamples, given every level that has attention."""
        return level in sorted(set(levels_with_attention))[: self.levels]


def downsample_factor(keep_ratio: float) -> float:
    """The ToDo factor whose share of keys and values kept is ``keep_ratio``: 1 / sqrt(keep)."""
    return 1.0 / math.sqrt(check_keep_ratio(keep_ratio))


def check_merge_ratio(ratio, sx: int = 2, sy: int = 2) -> float:
    """A merge ratio lies in [0, 1 - 1 / (sx * sy)]: each cell keeps its destination."""
    cap = 1.0 - 1.0 / (sx * sy)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= cap:
        raise ValueError(f"merge ratio={ratio!r} is outside [0, {cap}] (one destination per {sy}x{sx} cell stays)")
    return float(ratio)
