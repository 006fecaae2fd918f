"""FLOPs of the full SD-XL base U-Net on the meta device: PAPER.md section 2."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import atedm_compile as ac
from atedm_compile.config import PruningConfig
from atedm_compile.flops import count_phases, solve_keep_ratio, unet_inputs
from atedm_compile.models import build_unet


@pytest.fixture(scope="module")
def sdxl():
    return build_unet("sdxl-base", device="meta")


@pytest.fixture(scope="module")
def atedm_report(sdxl):
    # PAPER.md's figures are the paper's method: similarity copy, no similarity products.
    return count_phases(sdxl, ac.make_schedule("atedm", 50), PruningConfig(), height=1024, width=1024)


def test_full_model(atedm_report):
    assert round(atedm_report.full_tmacs, 3) == 6.761


def test_prune_less_phase(atedm_report):
    less = atedm_report.phases[0]
    assert less.name == "prune-less" and less.steps == (0, 15)
    assert round(less.tmacs, 3) == 4.989
    assert round(less.tmacs_with_scoring, 3) == 4.989


def test_all_pruned_phase(atedm_report):
    pruned = atedm_report.phases[1]
    # Model cost alone 4.0649; with 5 G-WPR rounds counted in, 4.0658: PAPER.md's 4.066.
    assert round(pruned.tmacs, 4) == 4.0649
    assert round(pruned.tmacs_with_scoring, 3) == 4.066
    assert pruned.flops_with_scoring - pruned.flops == sum(b.scoring_tmacs for b in pruned.blocks) * 2e12


def test_average_and_blocks(atedm_report):
    less, pruned = atedm_report.phases
    assert atedm_report.average_tmacs == pytest.approx((15 * less.tmacs + 35 * pruned.tmacs) / 50)
    blocks = {b.name: b for b in pruned.blocks}
    assert set(blocks) == {b.name for b in ac.attention_blocks(build_unet("sdxl-base", device="meta"))}
    assert all(b.keep_ratio == 0.37 for b in blocks.values())
    assert blocks["mid"].tmacs > blocks["down1.F"].tmacs > 0
    assert blocks["down1.F"].scoring_tmacs > blocks["mid"].scoring_tmacs > 0  # 4096 vs 1024 tokens


def test_per_phase_count_equals_whole_model_count(sdxl):
    runner = ac.apply(sdxl, "uniform")
    try:
        runner.start(1)
        with FlopCounterMode(display=False) as counter:
            sdxl(**unet_inputs(sdxl, 2, 64, 64))
    finally:
        ac.remove(sdxl)
    report = count_phases(sdxl, ac.make_schedule("uniform", 1), height=512, width=512)
    assert counter.get_total_flops() == report.phases[0].flops_with_scoring
    assert round(report.full_tmacs, 3) == 1.589


def test_dagger_is_about_4_5(sdxl):
    report = count_phases(sdxl, ac.make_schedule("atedm-dagger", 50, prune_less_steps=0), height=1024, width=1024)
    assert report.phases[0].tmacs == pytest.approx(4.5, abs=0.06)


def test_solve_keep_ratio_meets_the_budget():
    unet = build_unet("tiny", device="meta")
    full = count_phases(unet, ac.make_schedule("none", 1), height=256, width=256).full_tmacs
    target = 0.8 * full
    keep, report = solve_keep_ratio(unet, target, "uniform", 1, height=256, width=256, tolerance=0.05)
    assert 0 < keep < 1 and report.average_tmacs <= target
    looser = count_phases(unet, ac.make_schedule("uniform", 1, keep_ratio=min(1.0, keep + 0.05)), height=256,
                          width=256)
    assert looser.average_tmacs > report.average_tmacs


def test_unreachable_budget():
    with pytest.raises(ValueError, match="below what preset 'uniform' reaches"):
        solve_keep_ratio(build_unet("tiny", device="meta"), 1e-9, "uniform", 1, height=256, width=256)


def test_bad_image_size():
    with pytest.raises(ValueError, match="1024x1000 px is not a positive multiple of 32"):
        count_phases(build_unet("tiny", device="meta"), ac.make_schedule("none", 1), height=1000, width=1024)


def test_cross_attention_scorer_cost_is_counted_apart():
    unet = build_unet("tiny", device="meta")
    report = count_phases(unet, ac.make_schedule("uniform", 1), PruningConfig(scorer="ca-power"), 256, 256)
    assert report.phases[0].tmacs_with_scoring > report.phases[0].tmacs
    assert isinstance(torch.tensor(0), torch.Tensor)


def test_soft_delta_recovery_cost_is_counted_apart():
    unet = build_unet("tiny", device="meta")
    schedule = ac.make_schedule("uniform", 1, keep_ratio=0.5)
    hard, soft = (count_phases(unet, schedule, PruningConfig(recovery="delta", neighbours=m), 256, 256,
                               full_flops=1).phases[0] for m in (1, 3))
    assert soft.tmacs == hard.tmacs
    tokens = {b.name: (32 // 2 ** (b.level - 1)) ** 2 for b in ac.attention_blocks(unet)}
    widths = {b.name: unet.get_submodule(b.path).proj_in.out_features for b in ac.attention_blocks(unet)}
    for h, s in zip(hard.blocks, soft.blocks):
        # The weighted mean of 3 updates: one [1, 3] x [3, C] product per token of the CFG pair.
        assert (s.scoring_tmacs - h.scoring_tmacs) * 1e12 == pytest.approx(2 * tokens[h.name] * 3 * widths[h.name])


def test_solve_keep_ratio_with_scoring_counts_the_methods_own_work(monkeypatch):
    from atedm_compile import flops

    def fake_count(unet, schedule, *args, **kwargs):  # model cost = keep ratio, the method adds 0.1
        keep = schedule.phases[0].rules[0][1]
        return flops.FlopsReport("", "", 0, 0, 1, 2.0, 0, keep, keep + 0.1, [])

    monkeypatch.setattr(flops, "count_phases", fake_count)
    plain, _ = solve_keep_ratio(None, 0.6, "uniform", 1, tolerance=1e-3)
    keep, report = solve_keep_ratio(None, 0.6, "uniform", 1, tolerance=1e-3, with_scoring=True)
    assert plain == pytest.approx(0.6, abs=1e-3) and keep == pytest.approx(0.5, abs=1e-3)
    assert report.average_tmacs_with_scoring <= 0.6


def test_tome_at_half_ratio_meets_the_4_1_budget(sdxl):
    from atedm_compile.passes import ToMeConfig

    report = count_phases(sdxl, ac.make_schedule("uniform", 1, keep_ratio=0.5), ToMeConfig(), 1024, 1024)
    # supp. B.1: ToMe at 50% on self-attention, cross-attention and FF for the 4.1 budget.
    assert report.phases[0].tmacs == pytest.approx(4.1, abs=0.05)
    assert report.phases[0].tmacs_with_scoring > report.phases[0].tmacs


def test_counting_keeps_an_applied_runner():
    unet = build_unet("tiny", device="meta")
    runner = ac.apply(unet, "uniform")
    count_phases(unet, ac.make_schedule("none", 1), height=256, width=256)
    assert ac.runner_of(unet) is runner
    ac.remove(unet)


@pytest.mark.parametrize("model,size", [("sdxl-turbo", 512), ("sd15", 512), ("sd21", 768)])
def test_real_configs_trace_and_prune(model, size):
    unet = build_unet(model, device="meta")
    report = count_phases(unet, ac.make_schedule("uniform", 1, keep_ratio=0.5), height=size, width=size)
    pruned = report.phases[0]
    if model == "sdxl-turbo":
        assert pruned.tmacs < report.full_tmacs
    else:
        # SD 1.x / 2.x blocks have one layer: nothing after the pruning point, left alone.
        assert pruned.tmacs == report.full_tmacs


@pytest.fixture(scope="module")
def tiny_meta():
    return build_unet("tiny", device="meta")


_FULL = {}


def _cost(unet, keep, config=None, preset="uniform", steps=1):
    if id(unet) not in _FULL:  # the unpruned model, counted once
        _FULL[id(unet)] = count_phases(unet, ac.make_schedule("none", 1), height=256, width=256).full_flops
    return count_phases(unet, ac.make_schedule(preset, steps, keep_ratio=keep), config, 256, 256,
                        full_flops=_FULL[id(unet)])


def test_fit_keep_ratio_keeps_a_start_that_fits(tiny_meta):
    from atedm_compile.flops import fit_keep_ratio

    limit = _cost(tiny_meta, 0.4, PruningConfig()).average_tmacs_with_scoring
    keep, report, capped = fit_keep_ratio(tiny_meta, limit * (1 + 1e-9), "uniform", 1, PruningConfig(), start=0.4,
                                          height=256, width=256)
    assert (keep, capped) == (0.4, False) and report.average_tmacs_with_scoring == limit


def test_fit_keep_ratio_steps_below_a_start_whose_own_work_costs_more(tiny_meta):
    from atedm_compile.flops import fit_keep_ratio

    # The delta recovery's key cosines (and the distinct fill's) cost more than the paper's copy:
    # at AT-EDM's keep ratio it is over AT-EDM's MACs, a few tokens fewer it is not.
    delta = PruningConfig(recovery="delta", similarity="key-cosine", cell=3, fill="distinct")
    limit = _cost(tiny_meta, 0.4, PruningConfig()).average_tmacs_with_scoring * (1 + 1e-9)
    assert _cost(tiny_meta, 0.4, delta).average_tmacs_with_scoring > limit
    keep, report, capped = fit_keep_ratio(tiny_meta, limit, "uniform", 1, delta, start=0.4, height=256,
                                          width=256, tolerance=0.05, full_flops=_cost(tiny_meta, 1.0).full_flops)
    assert 0.3 < keep < 0.4 and not capped and report.average_tmacs_with_scoring <= limit
    assert report.average_tmacs_with_scoring == _cost(tiny_meta, keep, delta).average_tmacs_with_scoring
    # The largest that fits, to the tolerance.
    assert _cost(tiny_meta, keep + 0.05, delta).average_tmacs_with_scoring > limit


def test_fit_keep_ratio_solves_without_a_start_and_caps(tiny_meta):
    from atedm_compile.flops import fit_keep_ratio

    tome = ac.passes.ToMeConfig()
    limit = _cost(tiny_meta, 0.4, PruningConfig()).average_tmacs_with_scoring * (1 + 1e-9)
    keep, report, capped = fit_keep_ratio(tiny_meta, limit, "uniform", 1, tome, lowest=0.25, height=256, width=256,
                                          tolerance=0.05)
    assert 0.25 <= keep < 1 and not capped and report.average_tmacs_with_scoring <= limit
    assert keep == round(keep, 4)
    keep, report, capped = fit_keep_ratio(tiny_meta, 1e-9, "uniform", 1, tome, lowest=0.25, height=256, width=256)
    assert (keep, capped) == (0.25, True) and report.average_tmacs_with_scoring > 1e-9


def test_level2_preset_costs_each_block_at_its_levels_ratio():
    # atedm-level2 at keep 0.04: level-2 blocks cost what they cost at 0.4, the others at 0.04.
    unet = build_unet("tiny", device="meta")
    size = dict(height=128, width=128)  # 64 level-2 tokens (26 kept at 0.4), 16 level-3 ones (1 at 0.04)
    ours = count_phases(unet, ac.make_schedule("atedm-level2", 1, keep_ratio=0.04, prune_less_steps=0), **size)
    at = {keep: count_phases(unet, ac.make_schedule("uniform", 1, keep_ratio=keep), **size) for keep in (0.04, 0.4)}
    levels = {b.name: b.level for b in ac.attention_blocks(unet)}
    for block in ours.phases[0].blocks:
        same = next(b for b in at[0.4 if levels[block.name] == 2 else 0.04].phases[0].blocks if b.name == block.name)
        assert (block.tmacs, block.scoring_tmacs) == (same.tmacs, same.scoring_tmacs)
    assert at[0.04].phases[0].tmacs < ours.phases[0].tmacs < at[0.4].phases[0].tmacs
