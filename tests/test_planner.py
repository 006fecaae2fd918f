"""The joint planner: plans' schedules, their MACs against the counts they combine, the front."""

import pytest

from atedm_compile import planner
from atedm_compile.config import DEFAULT_PRUNING, DeepCacheConfig
from atedm_compile.flops import count_cached_steps, count_phases
from atedm_compile.models import build_unet
from atedm_compile.schedule import level2_keep_ratio, make_schedule

SIZE = dict(height=64, width=64, vae_factor=8)


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", device="meta")


def test_schedule_phases_and_rules():
    schedule = planner.Plan(keep_ratio=0.5, prune_less=0.3, level2_spared=0.5, interval=2).schedule(10)
    assert [(p.name, p.start, p.stop) for p in schedule.phases] == [
        ("prune-less+level2-spared", 0, 3), ("level2-spared", 3, 5), ("pruned", 5, 10)]
    assert schedule.phases[0].rules == (("*", 0.5), ("down*.F", 1.0), ("up*.L", 1.0), ("level2", 1.0))
    assert schedule.phases[2].rules == (("*", 0.5),)
    assert schedule.cache == DeepCacheConfig(interval=2, branch=0)
    # The DSAP preset is the plan with prune-less steps and nothing spared.
    dsap = make_schedule("atedm", 10, keep_ratio=0.5)
    assert [(p.start, p.stop, p.rules) for p in planner.Plan(0.5, 0.3).schedule(10).phases] == [
        (p.start, p.stop, p.rules) for p in dsap.phases]
    assert planner.Plan().schedule(4).phases[0].rules == ()
    assert planner.Plan(interval=1, branch=3).cache is None
    # So is the atedm-level2 preset, with its level-2 ratio.
    level2 = make_schedule("atedm-level2", 10, keep_ratio=0.04)
    plan = planner.Plan(0.04, 0.3, level2_keep=level2_keep_ratio(0.04))
    assert [(p.start, p.stop, p.rules) for p in plan.schedule(10).phases] == [
        (p.start, p.stop, p.rules) for p in level2.phases]
    assert plan.label == "keep 0.04, prune-less 0.3, level 2 keep 0.4"


@pytest.mark.parametrize("field,value", [("keep_ratio", 0), ("keep_ratio", 1.5), ("prune_less", -0.1),
                                         ("level2_spared", 2), ("interval", 0), ("branch", -1),
                                         ("level2_keep", 0.0), ("forecast", "cubic")])
def test_bad_plans_are_refused(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "keep_ratio" else "keep"):
        planner.Plan(**{field: value})


def test_plans_skip_repeats():
    found = planner.plans(keep_ratios=(1.0, 0.5), prune_less=(0.0, 0.3), intervals=(1, 2), branches=(0, 1),
                          level2_rule=(False,), forecasts=("none",))
    assert len(found) == len(set(found))
    assert planner.Plan(1.0, 0.0, 0.0, 1, 0) in found and planner.Plan(1.0, 0.3, 0.0, 1, 0) not in found
    # unpruned x (uncached + 2 branches) + pruned x 2 prune-less x (uncached + 2 branches)
    assert len(found) == 3 + 2 * 3


def test_plans_with_the_level2_rule():
    found = planner.plans(keep_ratios=(1.0, 0.09), prune_less=(0.3,), intervals=(1, 2), forecasts=("none",))
    # Unpruned plans have no level-2 ratio: 2 of them; pruned ones come with and without the rule.
    assert len(found) == 2 + 2 * 2
    ruled = [plan for plan in found if plan.level2_keep is not None]
    assert [plan.level2_keep for plan in ruled] == [pytest.approx(0.6)] * 2
    assert all(plan.keep_ratio == 0.09 for plan in ruled)


def test_cost_matches_the_counts_it_combines(unet):
    steps = 4
    pruned = count_phases(unet, make_schedule("atedm", steps, keep_ratio=0.37, prune_less_fraction=0.25),
                          DEFAULT_PRUNING, **SIZE)
    assert planner.plan_cost(unet, planner.Plan(), steps, **SIZE) == pytest.approx(pruned.full_tmacs, rel=1e-9)
    cached = count_cached_steps(unet, DeepCacheConfig(interval=2), steps, **SIZE)
    assert planner.plan_cost(unet, planner.Plan(interval=2), steps, **SIZE) == pytest.approx(cached.average_tmacs,
                                                                                           rel=1e-9)
    cost = planner.plan_cost(unet, planner.Plan(0.37, 0.25), steps, **SIZE)
    assert cost == pytest.approx(pruned.average_tmacs_with_scoring, rel=1e-9)
    both = planner.plan_cost(unet, planner.Plan(0.37, 0.25, interval=2), steps, **SIZE)
    assert both < min(cost, cached.average_tmacs)
    assert unet.forward.__func__ is type(unet).forward  # left as it was


def test_front_and_choose():
    points = [("a", 1.0, 40.0), ("b", 2.0, 30.0), ("c", 2.0, 35.0), ("d", 3.0, 20.0), ("e", 2.5, 19.0)]
    speed, quality = (lambda p: p[1]), (lambda p: p[2])
    assert [p[0] for p in planner.front(points, speed, quality)] == ["a", "c", "d"]
    assert planner.choose(points, 1.5, speed, quality)[0] == "c"
    assert planner.choose(points, 2.6, speed, quality)[0] == "d"
    assert planner.choose(points, 3.5, speed, quality) is None


def test_plans_with_the_forecast():
    found = planner.plans(keep_ratios=(1.0,), intervals=(1, 2))
    # Uncached: no forecast; cached: with and without.
    assert found == [planner.Plan(), planner.Plan(interval=2), planner.Plan(interval=2, forecast="linear")]
    assert planner.Plan(interval=2, forecast="linear").cache == DeepCacheConfig(interval=2, forecast="linear")
    assert planner.Plan(interval=2, forecast="linear").label == "cache 2/0 linear"
