"""The methods compared and the keep ratio each runs at under a FLOPs budget.

A budget is the paper's label: the TMACs of AT-EDM's all-pruned phase (one U-Net call on the CFG
pair). On SD-XL at 1024 px, 4.1 is keep 0.37 (supp. A.3: "when we target 4.1 TFLOPs ... we retain
37% tokens"), and AT-EDM's DSAP schedule then averages a little more over all steps (its
prune-less steps cost more). A budget can also be given as AT-EDM's keep ratio directly.

AT-EDM (the paper's method) runs at the budget's keep ratio; its DSAP-average MACs *with its own
work counted in* (G-WPR, recovery) are the limit every other method meets with its own work
counted in too (key similarities, ToMe's matching and merging): ``flops.fit_keep_ratio``. The
methods that prune the same number of tokens (``default``, ``random``) run at AT-EDM's keep ratio
where that fits and a few tokens fewer where their own work costs more; ToMe and AT-EDM-dagger
at the largest keep ratio that fits, flagged ``capped`` where even their smallest costs more.

This is the one planner: ``evaluate`` plans ``METHODS`` with it, and ``benchmarks/quality.py``
its own table of ``Method``s (``plan_budgets(..., table=...)``), at the keep ratios that carry the
paper's SD-XL budgets over to a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_PRUNING, PruningConfig, ToMeConfig, check_keep_ratio
from ..flops import count_phases, fit_keep_ratio, solve_keep_ratio
from ..schedule import make_schedule

# Part of plan.json's key: a plan solved under other rules is solved again.
PLANNER_VERSION = 2


KEEP_RULES = ("full", "budget", "matched")


@dataclass(frozen=True)
class Method:
    """A method to plan. preset: the DSAP schedule (None: the unpruned model); keep, how its keep
    ratio is chosen under a budget: ``budget`` (AT-EDM's keep ratio where it fits AT-EDM's MACs, a
    few tokens fewer where its own work costs more), ``matched`` (the largest that fits) or
    ``full`` (the unpruned model); capped_by: another method of the same table, planned before it,
    whose MACs (its own work counted in) cap this one's too (ToMe's token counts are coarser than
    AT-EDM's: "at ToMe's MACs"); above_budget: with capped_by, held to that method's MACs alone,
    above the budget where it spends more (ToMe's largest merge ratio cannot reach SD-XL's 2.9 on
    the shipped models), there at the largest keep ratio that fits."""

    label: str
    preset: str | None
    config: PruningConfig | ToMeConfig | None
    keep: str = "budget"
    capped_by: str | None = None
    above_budget: bool = False

    def __post_init__(self):
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep={self.keep!r} is not allowed; choose one of {list(KEEP_RULES)}")

    @property
    def lowest_keep(self) -> float:
        # ToMe keeps one destination per sx x sy cell; pruning keeps at least one token in a hundred.
        if isinstance(self.config, ToMeConfig):
            return self.config.lowest_keep
        return 0.01


METHODS = {
    "full": Method("full model", None, None, "full"),
    "atedm": Method("AT-EDM", "atedm", PruningConfig()),
    "default": Method("default (ours)", "atedm-level2", DEFAULT_PRUNING),
    "atedm-dagger": Method("AT-EDM-dagger", "atedm-dagger", PruningConfig(), "matched"),
    "tome": Method("ToMe", "atedm", ToMeConfig(), "matched"),
    "random": Method("random pruning", "atedm", PruningConfig(scorer="random")),
}
# Every budget's cost: AT-EDM as the paper runs it (G-WPR, similarity copy by attention).
REFERENCE = METHODS["atedm"]


def budget_label(budget: float | None = None, keep_ratio: float | None = None) -> str:
    """``4.1`` for a TMACs budget, ``keep0.37`` for one given as AT-EDM's keep ratio."""
    return f"{budget:g}" if budget is not None else f"keep{keep_ratio:g}"


def plan_budgets(unet, methods, budgets=(), keep_ratios=(), steps: int = 50, height: int = 1024,
                 width: int = 1024, vae_factor: int = 8, tolerance: float = 1e-3, table: dict | None = None) -> dict:
    """Per budget, the keep ratio and cost of every method in ``methods`` (names in ``table``,
    default ``METHODS``).

    ``unet`` is best on the meta device. Costs are TMACs of one U-Net call on the CFG pair, DSAP
    averages: ``tmacs`` the model's own MACs, ``tmacs_with_scoring`` with the method's own work
    (what is matched), ``share`` and ``share_with_scoring`` of the full model's.
    """
    table = METHODS if table is None else table
    unknown = [m for m in methods if m not in table]
    if unknown:
        raise ValueError(f"methods {unknown} not known; choose from {list(table)}")
    size = dict(height=height, width=width, vae_factor=vae_factor)
    full = count_phases(unet, make_schedule("none", steps), **size)

    def entry(keep: float, report, capped: bool = False) -> dict:
        return {"keep_ratio": round(keep, 4), "tmacs": report.average_tmacs,
                "tmacs_with_scoring": report.average_tmacs_with_scoring,
                "share": report.average_tmacs / full.full_tmacs,
                "share_with_scoring": report.average_tmacs_with_scoring / full.full_tmacs, "capped": capped}

    plan = {"full_tmacs": full.full_tmacs, "steps": steps, "height": height, "width": width, "budgets": []}
    wanted = [(budget_label(budget=b), b, None) for b in budgets]
    wanted += [(budget_label(keep_ratio=k), None, check_keep_ratio(k)) for k in keep_ratios]
    for label, budget, keep in wanted:
        if budget is not None:
            if budget <= 0:
                raise ValueError(f"budget {budget} TMACs must be positive (the full model costs {full.full_tmacs:.4g})")
            if budget >= full.full_tmacs:
                # Solved, it would be keep 1.0: the "pruned" rows would be the full model's.
                raise ValueError(f"budget {budget:g} TMACs is not below the full model's {full.full_tmacs:.4g} TMACs "
                                 f"per U-Net call at {width}x{height} px: nothing to prune; give budgets below it")
            keep, pruned = solve_keep_ratio(unet, budget, "uniform", 1, PruningConfig(), tolerance=tolerance, **size)
            pruned_tmacs = pruned.average_tmacs
        else:
            pruned_tmacs = count_phases(unet, make_schedule("uniform", 1, keep_ratio=keep), full_flops=full.full_flops,
                                        **size).average_tmacs
        atedm = count_phases(unet, make_schedule(REFERENCE.preset, steps, keep_ratio=keep), REFERENCE.config,
                             full_flops=full.full_flops, **size)
        limit = atedm.average_tmacs_with_scoring * (1 + 1e-9)
        methods_plan = {}
        for name in methods:
            method = table[name]
            if method.keep == "full":
                continue
            if (method.preset, method.config, method.keep, method.capped_by) == (REFERENCE.preset, REFERENCE.config,
                                                                                 "budget", None):
                methods_plan[name] = entry(keep, atedm)  # AT-EDM itself: the budget's cost
                continue
            own_limit = limit
            if method.capped_by is not None:
                if method.capped_by not in methods_plan:
                    raise ValueError(f"method {name!r} is held to the MACs of {method.capped_by!r} too: plan "
                                     f"{method.capped_by!r} before it")
                capping = methods_plan[method.capped_by]["share_with_scoring"] * full.full_tmacs * (1 + 1e-9)
                own_limit = capping if method.above_budget else min(limit, capping)
            start = keep if method.keep == "budget" and own_limit <= limit else None
            chosen, report, capped = fit_keep_ratio(
                unet, own_limit, method.preset, steps, method.config, start=start,
                lowest=method.lowest_keep, tolerance=tolerance, full_flops=full.full_flops, **size)
            methods_plan[name] = entry(chosen, report, capped)
        plan["budgets"].append({"label": label, "budget_tmacs": budget, "atedm_keep_ratio": round(keep, 4),
                                "pruned_phase_tmacs": pruned_tmacs, "limit_tmacs_with_scoring": limit,
                                "methods": methods_plan})
    return plan
