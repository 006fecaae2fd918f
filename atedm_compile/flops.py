"""FLOPs of a U-Net under a schedule, counted with ``torch.utils.flop_counter`` on the meta device.

The paper's "TFLOPs" are MACs of one U-Net call on the CFG pair (batch 2 per image): here
``tmacs = FLOPs / 2 / 1e12`` of that call. ``tmacs`` is the model's own cost with the first
layer's attention map reused for scoring; the work of scoring and recovery (G-WPR products, key
similarities) is counted apart, in ``tmacs_with_scoring``. FlopCounterMode counts matrix products
and convolutions only: top-k, gather, scatter and softmax are not in either figure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .caching import cached_forward, features_shape, full_forward, full_steps
from .config import DEFAULT_PRUNING, DeepCacheConfig, PruningConfig, ToMeConfig
from .models import check_image_size, unet_input_shapes
from .ops import keep_count
from .modules import (KeptMerge, NearestKept, TokenDownsample, TokenMatching, TokenMerge, TokenRecovery, TokenScorer,
                      TokenSelector, TokenUnmerge)
from .runner import apply, remove, runner_of
from .schedule import Schedule, make_schedule
from .tracing import attention_blocks


def unet_inputs(unet, batch: int, latent_height: int, latent_width: int, device="meta", dtype=torch.float32) -> dict:
    """Keyword inputs of one ``UNet2DConditionModel`` call at a given U-Net batch and latent size."""
    shapes = unet_input_shapes(unet.config, batch, latent_height, latent_width)
    inputs = {name: torch.randn(shapes[name], device=device, dtype=dtype) for name in ("sample", "encoder_hidden_states")}
    inputs["timestep"] = torch.tensor(999.0, device=device)
    added = {name: torch.randn(shapes[name], device=device, dtype=dtype) for name in ("text_embeds", "time_ids")
             if name in shapes}
    if added:
        inputs["added_cond_kwargs"] = added
    return inputs


# The work a method adds to the model's own: AT-EDM's scoring and recovery, ToMe's matching,
# merging and unmerging, ToDo's downsampling. Counted apart as "scoring".
OVERHEAD_MODULES = (TokenScorer, TokenSelector, NearestKept, KeptMerge, TokenRecovery, TokenMatching, TokenMerge,
                    TokenUnmerge, TokenDownsample)


def _count(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


@dataclass
class BlockCost:
    name: str
    tmacs: float
    scoring_tmacs: float
    keep_ratio: float


@dataclass
class PhaseCost:
    name: str
    steps: tuple[int, int]
    tmacs: float
    tmacs_with_scoring: float
    flops: int
    flops_with_scoring: int
    blocks: list[BlockCost] = field(default_factory=list)


@dataclass
class FlopsReport:
    model: str
    schedule: str
    height: int
    width: int
    images: int
    full_tmacs: float
    full_flops: int
    average_tmacs: float
    average_tmacs_with_scoring: float
    phases: list[PhaseCost]

    def to_dict(self) -> dict:
        """The report as ``flops --json`` prints it: TMACs to six significant digits (enough for
        SD-XL's and a tiny model's), FLOPs exact, phases and their blocks by name."""
        return {
            "model": self.model,
            "schedule": self.schedule,
            "height": self.height,
            "width": self.width,
            "unit": f"TMACs of one U-Net call on the CFG pair (FLOPs / 2 / 1e12, batch {2 * self.images})",
            "full_tmacs": _sig(self.full_tmacs),
            "average_tmacs": _sig(self.average_tmacs),
            "average_tmacs_with_scoring": _sig(self.average_tmacs_with_scoring),
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
                for p in self.phases
            },
        }


def _sig(value: float) -> float:
    return float(f"{value:.6g}")


def count_phases(
    unet,
    schedule: Schedule,
    config: PruningConfig | ToMeConfig | None = None,
    height: int = 1024,
    width: int = 1024,
    images: int = 1,
    vae_factor: int = 8,
    model_name: str = "",
    full_flops: int | None = None,
) -> FlopsReport:
    """Cost of one U-Net call (CFG pair: batch ``2 * images``) in every phase of ``schedule``.

    ``unet`` is best on the meta device (no memory). It is left as it was. ``config`` defaults
    to what ``apply`` runs (``config.DEFAULT_PRUNING``). ``full_flops``, when known from an earlier
    count at the same size, saves counting the full model again.
    """
    config = config or DEFAULT_PRUNING
    check_image_size(height, width, unet.config, vae_factor)
    device = next(unet.parameters()).device
    inputs = unet_inputs(unet, 2 * images, height // vae_factor, width // vae_factor, device=device)
    macs = 2 * 1e12  # FLOPs per TMAC

    previous = runner_of(unet)
    remove(unet)
    if full_flops is None:
        full_flops, _ = _count(lambda: unet(**inputs))
    runner = apply(unet, schedule, config)
    try:
        runner.start(schedule.num_steps)
        phases = []
        for phase in schedule.phases:
            runner.use_phase(phase.name)
            captured = []
            hooks = [
                m.register_forward_hook(lambda mod, args, out: captured.append((mod, args)))
                for gm in runner.built_graphs().values() for m in gm.modules() if isinstance(m, OVERHEAD_MODULES)
            ]
            try:
                total, by_module = _count(lambda: unet(**inputs))
            finally:
                for hook in hooks:
                    hook.remove()
            # Scoring and recovery re-counted alone, with the inputs they saw, per block.
            scoring: dict[str, int] = {}
            block_of = {id(m): name for (name, _), gm in runner.built_graphs().items() for m in gm.modules()}
            for module, args in captured:
                flops, _ = _count(lambda: module(*args))
                scoring[block_of[id(module)]] = scoring.get(block_of[id(module)], 0) + flops
            overhead = sum(scoring.values())
            keep = phase.keep_ratios(runner.blocks)
            blocks = [
                BlockCost(
                    b.name,
                    (by_module.get(f"{type(unet).__name__}.{b.path}", 0) - scoring.get(b.name, 0)) / macs,
                    scoring.get(b.name, 0) / macs,
                    keep[b.name],
                )
                for b in runner.blocks
            ]
            phases.append(PhaseCost(phase.name, (phase.start, phase.stop), (total - overhead) / macs, total / macs,
                                    total - overhead, total, blocks))
    finally:
        remove(unet)
        if previous is not None:
            previous.install()

    def average(attr: str) -> float:
        return sum(getattr(p, attr) * (p.steps[1] - p.steps[0]) for p in phases) / schedule.num_steps

    return FlopsReport(model_name, schedule.name, height, width, images, full_flops / macs, full_flops,
                       average("tmacs"), average("tmacs_with_scoring"), phases)


def solve_keep_ratio(
    unet,
    target_tmacs: float,
    preset: str = "atedm",
    num_steps: int = 50,
    config: PruningConfig | ToMeConfig | None = None,
    height: int = 1024,
    width: int = 1024,
    tolerance: float = 2e-3,
    vae_factor: int = 8,
    lowest: float = 0.01,
    with_scoring: bool = False,
    highest: float = 1.0,
    full_flops: int | None = None,
    **preset_options,
) -> tuple[float, FlopsReport]:
    """The largest keep ratio in [``lowest``, ``highest``] whose schedule-average ``tmacs`` (with
    ``with_scoring``: ``tmacs_with_scoring``, the method's own work included) is at most
    ``target_tmacs``.

    Bisection to ``tolerance`` (cost grows with the keep ratio). Raises ValueError for an
    unreachable target. ToMe (a ``ToMeConfig``, merging ``1 - keep``) needs ``lowest=0.25``.
    ``full_flops``: the unpruned model's FLOPs where already counted.
    """
    measure = "average_tmacs_with_scoring" if with_scoring else "average_tmacs"

    def report(keep: float) -> FlopsReport:
        nonlocal full_flops
        schedule = make_schedule(preset, num_steps, keep_ratio=keep, **preset_options)
        result = count_phases(unet, schedule, config, height, width, vae_factor=vae_factor, full_flops=full_flops)
        full_flops = result.full_flops
        return result

    low, high = lowest, highest
    bottom = report(low)
    if getattr(bottom, measure) > target_tmacs and bottom.average_tmacs >= bottom.full_tmacs:
        raise ValueError(f"preset {preset!r} prunes nothing, whatever the keep ratio: it costs the full model's "
                         f"{bottom.full_tmacs:.4g} TMACs, above the target {target_tmacs:.4g}")
    if getattr(bottom, measure) > target_tmacs:
        raise ValueError(
            f"target {target_tmacs:.4g} TMACs is below what preset {preset!r} reaches at keep_ratio={low} "
            f"({getattr(bottom, measure):.4g}); the full model costs {bottom.full_tmacs:.4g}"
        )
    if highest == 1.0 and bottom.full_tmacs <= target_tmacs:
        return 1.0, report(1.0)
    best = (low, bottom)
    while high - low > tolerance:
        middle = (low + high) / 2
        candidate = report(middle)
        if getattr(candidate, measure) <= target_tmacs:
            low, best = middle, (middle, candidate)
        else:
            high = middle
    return round(best[0], 4), best[1]


def next_keep_down(keep: float, token_counts) -> float:
    """The largest keep ratio (4 digits) below ``keep`` at which some block of ``token_counts``
    tokens keeps one token fewer (``ops.keep_count``): the next ratio down that costs less."""
    below = max(((keep_count(n, keep) - 0.5) / n for n in token_counts if keep_count(n, keep) > 1), default=0.01)
    return math.ceil(below * 1e4 - 1) / 1e4


def fit_keep_ratio(
    unet,
    limit_tmacs: float,
    preset: str = "atedm",
    num_steps: int = 50,
    config: PruningConfig | ToMeConfig | None = None,
    *,
    start: float | None = None,
    lowest: float = 0.01,
    with_scoring: bool = True,
    height: int = 1024,
    width: int = 1024,
    vae_factor: int = 8,
    tolerance: float = 1e-3,
    full_flops: int | None = None,
) -> tuple[float, FlopsReport, bool]:
    """The keep ratio (4 digits) a method runs at under a MACs limit: (keep, its report, capped).

    Cost: the schedule average of ``tmacs_with_scoring`` (the method's own work counted in; with
    ``with_scoring=False``, of ``tmacs``). ``start``, a keep ratio the method would rather run at
    (a budget's own), is kept where it fits; where it costs a little more (its own work), it steps
    down a token count at a time (a few steps), then bisects below it. Without ``start``, the
    largest keep ratio in [``lowest``, 1] that fits (``solve_keep_ratio``), rounded to 4 digits and stepped
    down where the rounding went over. ``capped``: even ``lowest`` costs more; it runs there.
    """
    measure = "average_tmacs_with_scoring" if with_scoring else "average_tmacs"
    size = dict(height=height, width=width, vae_factor=vae_factor)
    flops = full_flops

    def cost(keep: float) -> FlopsReport:
        nonlocal flops
        report = count_phases(unet, make_schedule(preset, num_steps, keep_ratio=keep), config, full_flops=flops,
                              **size)
        flops = report.full_flops
        return report

    if start is not None:
        keep, report = start, cost(start)
        latent_h, latent_w = height // vae_factor, width // vae_factor
        tokens = {(latent_h // 2 ** (b.level - 1)) * (latent_w // 2 ** (b.level - 1)) for b in attention_blocks(unet)}
        for _ in range(4):
            if getattr(report, measure) <= limit_tmacs or keep <= lowest:
                break
            keep = max(lowest, next_keep_down(keep, tokens))
            report = cost(keep)
        if getattr(report, measure) <= limit_tmacs:
            return keep, report, False
    try:
        keep, _ = solve_keep_ratio(unet, limit_tmacs, preset, num_steps, config, tolerance=tolerance, lowest=lowest,
                                   with_scoring=with_scoring, highest=1.0 if start is None else keep,
                                   full_flops=flops, **size)
    except ValueError:  # out of reach: the lowest keep ratio, flagged
        return lowest, cost(lowest), True
    report = cost(keep)
    while getattr(report, measure) > limit_tmacs and keep > lowest:  # the 4-digit rounding went up
        keep = max(lowest, round(keep - 1e-4, 4))
        report = cost(keep)
    return keep, report, getattr(report, measure) > limit_tmacs



@dataclass
class CachedStepCost:
    """MACs of a run with DeepCache's cached steps (CFG pair: batch ``2 * images``).

    full_tmacs: a full step (the whole U-Net); cached_tmacs: a cached step (the shallow layers);
    average_tmacs: the mean over the ``num_steps`` steps, ``full_steps`` of them full.
    """

    branch: int
    interval: int
    spacing: str
    num_steps: int
    full_steps: int
    height: int
    width: int
    images: int
    full_tmacs: float
    cached_tmacs: float
    average_tmacs: float
    full_flops: int
    cached_flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_cached_steps(
    unet,
    cache: DeepCacheConfig,
    num_steps: int = 50,
    height: int = 1024,
    width: int = 1024,
    images: int = 1,
    vae_factor: int = 8,
) -> CachedStepCost:
    """MACs of a full and a cached step at ``cache.branch`` and their mean over a ``num_steps``-step
    run with ``cache``'s full steps. ``unet`` is best on the meta device; it runs as it is (a
    runner applied to it runs its current phase in both steps).

    Example:
        >>> from atedm_compile.models import build_unet
        >>> cost = count_cached_steps(build_unet("tiny", device="meta"), DeepCacheConfig(interval=2), 10, 256, 256)
        >>> cost.full_steps, cost.cached_tmacs < cost.full_tmacs
        (5, True)
    """
    check_image_size(height, width, unet.config, vae_factor)
    device = next(unet.parameters()).device
    latent = (height // vae_factor, width // vae_factor)
    inputs = unet_inputs(unet, 2 * images, *latent, device=device)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs.get("added_cond_kwargs"))
    features = torch.zeros(features_shape(unet.config, cache.branch, 2 * images, *latent), device=device)
    full, _ = _count(lambda: full_forward(unet, cache.branch, *args))
    cached, _ = _count(lambda: cached_forward(unet, cache.branch, features, *args))
    count = len(full_steps(cache, num_steps))
    macs = 2 * 1e12  # FLOPs per TMAC
    average = (count * full + (num_steps - count) * cached) / num_steps
    return CachedStepCost(cache.branch, cache.interval, cache.spacing, num_steps, count, height, width, images,
                          full / macs, cached / macs, average / macs, full, cached)
