"""The methods compared and the keep ratio each runs at under a FLOPs budget.

A budget is the paper's label: the TMACs of AT-EDM's all-pruned phase (one U-Net call on the CFG
pair). On SD-XL at 1024 px, 4.1 is keep 0.37 (supp. A.3: "when we target 4.1 TFLOPs ... we retain
37% tokens"), and AT-EDM's DSAP schedule then averages a little more over all steps (its
prune-less steps cost more). Random pruning runs at AT-EDM's keep ratio (the same MACs); ToMe and
AT-EDM-dagger get the largest keep ratio whose schedule-average MACs are at most AT-EDM's
(``flops.solve_keep_ratio``), flagged ``capped`` when even their smallest one costs more. A budget
can also be given as AT-EDM's keep ratio directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PruningConfig, check_keep_ratio
from ..flops import count_phases, solve_keep_ratio
from ..config import ToMeConfig
from ..schedule import make_schedule


@dataclass(frozen=True)
class Method:
    """preset: the DSAP schedule (None: the unpruned model); keep: ``budget`` (AT-EDM's keep
    ratio) or ``matched`` (solved to AT-EDM's schedule-average MACs)."""

    label: str
    preset: str | None
    config: PruningConfig | ToMeConfig | None
    keep: str = "budget"

    @property
    def lowest_keep(self) -> float:
        # ToMe keeps one destination per sx x sy cell; pruning keeps at least one token in a hundred.
        if isinstance(self.config, ToMeConfig):
            return 1.0 / (self.config.sx * self.config.sy)
        return 0.01


METHODS = {
    "full": Method("full model", None, None, "full"),
    "atedm": Method("AT-EDM", "atedm", PruningConfig()),
    "atedm-dagger": Method("AT-EDM-dagger", "atedm-dagger", PruningConfig(), "matched"),
    "tome": Method("ToMe", "atedm", ToMeConfig(), "matched"),
    "random": Method("random pruning", "atedm", PruningConfig(scorer="random")),
}


def budget_label(budget: float | None = None, keep_ratio: float | None = None) -> str:
    """``4.1`` for a TMACs budget, ``keep0.37`` for one given as AT-EDM's keep ratio."""
    return f"{budget:g}" if budget is not None else f"keep{keep_ratio:g}"


def plan_budgets(unet, methods, budgets=(), keep_ratios=(), steps: int = 50, height: int = 1024,
                 width: int = 1024, vae_factor: int = 8, tolerance: float = 1e-3) -> dict:
    """Per budget, the keep ratio and cost of every method in ``methods`` (names in ``METHODS``).

    ``unet`` is best on the meta device. Costs are TMACs of one U-Net call on the CFG pair:
    ``tmacs`` the DSAP-schedule average of the model's own MACs, ``tmacs_with_scoring`` with the
    method's scoring / matching work, ``share`` of the full model's.
    """
    size = dict(height=height, width=width, vae_factor=vae_factor)
    full = count_phases(unet, make_schedule("none", steps), **size)

    def cost(method: Method, keep: float):
        return count_phases(unet, make_schedule(method.preset, steps, keep_ratio=keep), method.config,
                            full_flops=full.full_flops, **size)

    def entry(keep: float, report, capped: bool = False) -> dict:
        return {"keep_ratio": round(keep, 4), "tmacs": report.average_tmacs,
                "tmacs_with_scoring": report.average_tmacs_with_scoring,
                "share": report.average_tmacs / full.full_tmacs, "capped": capped}

    plan = {"full_tmacs": full.full_tmacs, "steps": steps, "height": height, "width": width, "budgets": []}
    wanted = [(budget_label(budget=b), b, None) for b in budgets]
    wanted += [(budget_label(keep_ratio=k), None, check_keep_ratio(k)) for k in keep_ratios]
    for label, budget, keep in wanted:
        if budget is not None:
            if budget <= 0:
                raise ValueError(f"budget {budget} TMACs must be positive (the full model costs {full.full_tmacs:.4g})")
            keep, pruned = solve_keep_ratio(unet, budget, "uniform", 1, PruningConfig(), tolerance=tolerance, **size)
            pruned_tmacs = pruned.average_tmacs
        else:
            pruned_tmacs = count_phases(unet, make_schedule("uniform", 1, keep_ratio=keep), full_flops=full.full_flops,
                                        **size).average_tmacs
        atedm = cost(METHODS["atedm"], keep)
        methods_plan = {}
        for name in methods:
            method = METHODS[name]
            if method.keep == "full":
                continue
            if method.keep == "budget":
                methods_plan[name] = entry(keep, atedm if name == "atedm" else cost(method, keep))
                continue
            try:
                chosen, report = solve_keep_ratio(unet, atedm.average_tmacs, method.preset, steps, method.config,
                                                  tolerance=tolerance, lowest=method.lowest_keep, **size)
                methods_plan[name] = entry(chosen, report)
            except ValueError:  # out of reach: run at the lowest keep ratio, flagged capped
                methods_plan[name] = entry(method.lowest_keep, cost(method, method.lowest_keep), capped=True)
        plan["budgets"].append({"label": label, "budget_tmacs": budget, "atedm_keep_ratio": round(keep, 4),
                                "pruned_phase_tmacs": pruned_tmacs, "methods": methods_plan})
    return plan
