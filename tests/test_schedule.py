import pytest

from atedm_compile import attention_blocks, make_schedule
from atedm_compile.schedule import Phase, Schedule, level2_keep_ratio


@pytest.fixture(scope="module")
def blocks(tiny_unet):
    return attention_blocks(tiny_unet)


def test_atedm_preset_is_the_papers_dsap(blocks):
    schedule = make_schedule("atedm", 50)
    assert [(p.name, p.steps) for p in schedule.phases] == [("prune-less", range(0, 15)), ("pruned", range(15, 50))]
    less = schedule.phases[0].keep_ratios(blocks)
    unpruned = sorted(name for name, keep in less.items() if keep == 1.0)
    assert unpruned == ["down1.F", "down2.F", "up0.L", "up1.L"]
    assert {keep for name, keep in less.items() if name not in unpruned} == {0.37}
    assert set(schedule.phases[1].keep_ratios(blocks).values()) == {0.37}


def test_dagger_never_prunes_level_two(blocks):
    for phase in make_schedule("atedm-dagger", 50).phases:
        keep = phase.keep_ratios(blocks)
        assert all(keep[b.name] == 1.0 for b in blocks if b.level == 2)
        assert any(keep[b.name] < 1.0 for b in blocks if b.level == 3)


def test_level2_preset_keeps_two_root_keep_at_level_two(blocks):
    schedule = make_schedule("atedm-level2", 50, keep_ratio=0.04)
    assert [(p.name, p.steps) for p in schedule.phases] == [("prune-less", range(0, 15)), ("pruned", range(15, 50))]
    pruned = schedule.phases[1].keep_ratios(blocks)
    assert [pruned[b.name] for b in blocks if b.level == 2] == [pytest.approx(0.4)] * 5
    assert {pruned[b.name] for b in blocks if b.level == 3} == {0.04}
    # The prune-less phase still leaves F-L alone, whatever the level's ratio.
    less = schedule.phases[0].keep_ratios(blocks)
    assert sorted(name for name, keep in less.items() if keep == 1.0) == ["down1.F", "down2.F", "up0.L", "up1.L"]
    assert less["down1.L"] == pytest.approx(0.4) and less["mid"] == 0.04


def test_level2_preset_at_a_quarter_and_above_is_the_dagger(blocks):
    # 2 sqrt(0.25) = 1: level 2 is left unpruned, as AT-EDM-dagger leaves it.
    for keep in (0.25, 0.37, 1.0):
        level2 = make_schedule("atedm-level2", 20, keep_ratio=keep)
        dagger = make_schedule("atedm-dagger", 20, keep_ratio=keep)
        for ours, theirs in zip(level2.phases, dagger.phases):
            assert ours.keep_ratios(blocks) == theirs.keep_ratios(blocks)


def test_level2_keep_ratio_rule():
    assert [level2_keep_ratio(k) for k in (0.01, 0.09, 0.16, 0.5)] == [pytest.approx(0.2), pytest.approx(0.6),
                                                                        pytest.approx(0.8), 1.0]
    with pytest.raises(ValueError, match=r"keep_ratio=0 .*\(0, 1\]"):
        level2_keep_ratio(0)


def test_prune_more_early_moves_the_prune_less_phase_to_the_end():
    schedule = make_schedule("prune-more-early", 50)
    assert [(p.name, p.steps) for p in schedule.phases] == [("pruned", range(0, 35)), ("prune-less", range(35, 50))]


def test_uniform_and_none(blocks):
    uniform = make_schedule("uniform", 20, keep_ratio=0.5)
    assert len(uniform.phases) == 1 and set(uniform.phases[0].keep_ratios(blocks).values()) == {0.5}
    none = make_schedule("none", 20)
    assert set(none.phases[0].keep_ratios(blocks).values()) == {1.0}


@pytest.mark.parametrize("steps,prune_less", [(1, 0), (2, 1), (4, 1), (10, 3), (25, 8)])
def test_few_step_schedules(steps, prune_less):
    schedule = make_schedule("atedm", steps)
    assert schedule.num_steps == steps
    lengths = {p.name: len(p.steps) for p in schedule.phases}
    assert lengths.get("prune-less", 0) == prune_less
    assert sum(lengths.values()) == steps


@pytest.mark.parametrize("selection,unpruned", [("F-M", {"down1.F", "down2.F", "up0.M", "up1.M"}),
                                                ("L-F", {"down1.L", "down2.L", "up0.F", "up1.F"})])
def test_prune_less_selections(blocks, selection, unpruned):
    keep = make_schedule("atedm", 50, prune_less_blocks=selection).phases[0].keep_ratios(blocks)
    assert {name for name, k in keep.items() if k == 1.0} == unpruned


def test_selectors_by_name_path_and_level(blocks):
    phase = Phase("p", 0, 1, (("*", 0.5), ("down_blocks.1.attentions.1", 0.9), ("up0.M", 1.0), ("level2", 0.7)))
    keep = phase.keep_ratios(blocks)
    assert keep["down1.L"] == 0.7 and keep["up0.M"] == 1.0 and keep["mid"] == 0.5


def test_phase_at():
    schedule = make_schedule("atedm", 10)
    assert [schedule.phase_at(i).name for i in (0, 2, 3, 9)] == ["prune-less", "prune-less", "pruned", "pruned"]
    with pytest.raises(ValueError, match="step 10 is outside"):
        schedule.phase_at(10)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown schedule preset 'fast'.*'atedm'"):
        make_schedule("fast")


def test_unknown_block_name(blocks):
    with pytest.raises(ValueError, match="unknown block 'down9.F'.*down1.F"):
        Phase("p", 0, 1, (("down9.F", 0.5),)).keep_ratios(blocks)


@pytest.mark.parametrize("selection", ["M-L", "F", "F-X"])
def test_bad_prune_less_selection(selection):
    with pytest.raises(ValueError, match=f"selection {selection!r}"):
        make_schedule("atedm", 50, prune_less_blocks=selection)


@pytest.mark.parametrize("keep", [0, 1.01, -1])
def test_bad_keep_ratio(keep):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        make_schedule("uniform", 10, keep_ratio=keep)


def test_phases_must_cover_every_step():
    with pytest.raises(ValueError, match="cover steps 0..9, but num_steps=12"):
        Schedule((Phase("a", 0, 10),), 12)
    with pytest.raises(ValueError, match="expected it to start at step 5"):
        Schedule((Phase("a", 0, 5), Phase("b", 6, 10)), 10)


def test_schedule_for_other_step_count_is_refused():
    with pytest.raises(ValueError, match="covers 50 steps but sampling runs 30"):
        make_schedule("atedm", 50).check_covers(30)


def test_duplicate_phase_names_are_refused():
    with pytest.raises(ValueError, match=r"phase names \['a'\] are used more than once"):
        Schedule((Phase("a", 0, 2), Phase("a", 2, 4)), 4)


@pytest.mark.parametrize("rules, match", [
    (((1, 0.5),), "selector 1 in phase 'p' must be a non-empty string"),
    ((("", 0.5),), "selector '' in phase 'p' must be a non-empty string"),
    ((("*", float("nan")),), r"keep ratio of '\*' in phase 'p'=nan is outside \(0, 1\]"),
    ((("*",),), r"rule \('\*',\) of phase 'p' must be a \(selector, keep ratio\) pair"),
])
def test_bad_rules_are_refused(rules, match):
    with pytest.raises(ValueError, match=match):
        Phase("p", 0, 1, rules)
