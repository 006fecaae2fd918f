import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

import atedm_compile as ac
from atedm_compile.flops import unet_inputs
from atedm_compile.models import build_unet, tiny_sd15_pipeline

from reference import pruned_block


def _sample(pipe, steps=4, guidance=5.0, images=1, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=steps, height=256, width=256, guidance_scale=guidance,
                num_images_per_prompt=images, generator=generator, output_type="latent", **kwargs).images


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    ac.remove(tiny_pipe)
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)


@pytest.mark.parametrize("schedule,options", [("none", {}), ("uniform", {"keep_ratio": 1.0})])
def test_keep_one_everywhere_equals_untouched_pipeline(pipe, schedule, options):
    expected = _sample(pipe)
    ac.apply(pipe, schedule, **options)
    torch.testing.assert_close(_sample(pipe), expected, atol=1e-5, rtol=0)


def test_phase_runs_by_step(pipe):
    runner = ac.apply(pipe, "atedm")
    _sample(pipe, steps=10)
    assert [(c.step, c.phase) for c in runner.calls] == [(i, "prune-less" if i < 3 else "pruned") for i in range(10)]


@pytest.mark.parametrize("guidance,images", [(1.0, 1), (5.0, 1), (5.0, 2)])
def test_with_and_without_cfg_and_batches(pipe, guidance, images):
    runner = ac.apply(pipe, "atedm")
    with runner.capture_kept_tokens() as kept:
        out = _sample(pipe, steps=4, guidance=guidance, images=images)
    assert out.shape == (images, 4, 32, 32) and torch.isfinite(out).all()
    assert [c.phase for c in runner.calls] == ["prune-less", "pruned", "pruned", "pruned"]
    unet_batch = images * (2 if guidance > 1 else 1)
    assert kept["down1.F"].shape == (unet_batch, 95) and kept["mid"].shape == (unet_batch, 24)


def test_level2_preset_keeps_more_tokens_at_level_two(pipe):
    runner = ac.apply(pipe, "atedm-level2", keep_ratio=0.04)
    with runner.capture_kept_tokens() as kept:
        _sample(pipe, steps=4)
    assert [c.phase for c in runner.calls] == ["prune-less", "pruned", "pruned", "pruned"]
    # Level 2: 16 x 16 tokens, keep 2 sqrt(0.04) = 0.4 -> 102; level 3: 8 x 8, keep 0.04 -> 3.
    assert kept["down1.F"].shape == (2, 102) and kept["up1.L"].shape == (2, 102)
    assert kept["mid"].shape == (2, 3) and kept["up0.L"].shape == (2, 3)


@pytest.mark.parametrize("scheduler_class", [DPMSolverMultistepScheduler, HeunDiscreteScheduler])
def test_switch_follows_the_steps_whatever_the_scheduler(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    runner = ac.apply(pipe, "atedm")
    _sample(pipe, steps=5)
    # Heun makes two U-Net calls per step (2 * 5 - 1 in all): both calls of a step run its phase.
    order = pipe.scheduler.order
    steps = [i // order for i in range(len(pipe.scheduler.timesteps))]
    assert [c.step for c in runner.calls] == steps
    expected = ac.make_schedule("atedm", 5)
    assert [c.phase for c in runner.calls] == [expected.phase_at(i).name for i in steps]


def test_default_recovery_is_merge_delta_by_key_cosine_and_the_papers_stays_by_name(pipe):
    from atedm_compile.config import DEFAULT_PRUNING, PruningConfig
    from atedm_compile.modules import TokenRecovery

    assert ac.apply(pipe, "uniform").config == DEFAULT_PRUNING
    recoveries = [m for m in ac.runner_of(pipe).graph("down1.F", 0.37).modules() if isinstance(m, TokenRecovery)]
    assert [(r.method, r.similarity) for r in recoveries] == [("merge-delta", "key-cosine")]
    paper = PruningConfig()
    assert (paper.recovery, paper.similarity, paper.scorer) == ("similarity", "attention", "gwpr")
    assert ac.apply(pipe, "uniform", paper).config == paper


def test_pruning_changes_the_output(pipe):
    expected = _sample(pipe)
    ac.apply(pipe, "uniform", keep_ratio=0.37)
    assert not torch.allclose(_sample(pipe), expected, atol=1e-3)


def test_remove_restores_exactly_and_apply_is_idempotent(pipe):
    unet = pipe.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    expected = _sample(pipe)
    first = ac.apply(pipe, "uniform", keep_ratio=0.5)
    pruned = _sample(pipe)
    second = ac.apply(pipe, "uniform", keep_ratio=0.5)
    assert ac.runner_of(pipe) is second and ac.runner_of(pipe) is not first
    torch.testing.assert_close(_sample(pipe), pruned, atol=0, rtol=0)
    assert list(unet.state_dict()) == list(state)
    ac.remove(pipe)
    ac.remove(pipe)
    assert ac.runner_of(pipe) is None
    assert all("forward" not in unet.get_submodule(b.path).__dict__ for b in ac.attention_blocks(unet))
    assert "step" not in pipe.scheduler.__dict__
    torch.testing.assert_close(_sample(pipe), expected, atol=0, rtol=0)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_phase_graphs_share_the_unet_weights(pipe):
    runner = ac.apply(pipe, "atedm")
    runner.start(10)
    unet_storage = {p.data_ptr() for p in pipe.unet.parameters()}
    graphs = list(runner.built_graphs().values())
    assert len(graphs) == 11  # 7 blocks pruned in both phases share a graph, 4 more in the pruned phase
    for gm in graphs:
        assert {p.data_ptr() for p in gm.parameters()} <= unet_storage
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in build_unet("tiny").parameters())


def test_schedule_must_cover_the_sampling_steps(pipe):
    ac.apply(pipe, ac.make_schedule("atedm", 50))
    with pytest.raises(ValueError, match="covers 50 steps but sampling runs 4"):
        _sample(pipe, steps=4)


def test_explicit_schedule_with_matching_steps(pipe):
    runner = ac.apply(pipe, ac.make_schedule("atedm", 4, prune_less_steps=2))
    _sample(pipe, steps=4)
    assert [c.phase for c in runner.calls] == ["prune-less", "prune-less", "pruned", "pruned"]


def test_bad_preset_fails_at_apply(pipe):
    with pytest.raises(ValueError, match="unknown schedule preset"):
        ac.apply(pipe, "quick")
    with pytest.raises(ValueError, match="keep_ratio=2"):
        ac.apply(pipe, "atedm", keep_ratio=2)


@pytest.mark.parametrize("height,width,channels,match", [(30, 32, 4, "30x32 is not a multiple of 4"),
                                                         (32, 32, 3, r"not \[batch, 4, height, width\]")])
def test_latent_the_unet_cannot_take(tiny_unet, height, width, channels, match):
    runner = ac.apply(tiny_unet, "uniform")
    try:
        runner.start(1)
        inputs = unet_inputs(tiny_unet, 1, height, width, device="cpu")
        inputs["sample"] = torch.randn(1, channels, height, width)
        with pytest.raises(ValueError, match=match):
            tiny_unet(**inputs)
    finally:
        ac.remove(tiny_unet)


def test_bare_unet_needs_a_step(tiny_unet):
    ac.apply(tiny_unet, "uniform")
    try:
        with pytest.raises(RuntimeError, match="start"):
            tiny_unet(**unet_inputs(tiny_unet, 1, 32, 32, device="cpu"))
    finally:
        ac.remove(tiny_unet)


def test_bare_unet_phases(tiny_unet):
    inputs = unet_inputs(tiny_unet, 2, 32, 32, device="cpu")
    expected = tiny_unet(**inputs).sample
    runner = ac.apply(tiny_unet, "atedm")
    try:
        runner.start(10)
        runner.use_phase("pruned")
        pruned = tiny_unet(**inputs).sample
        with pytest.raises(ValueError, match="unknown phase 'fast'"):
            runner.use_phase("fast")
    finally:
        ac.remove(tiny_unet)
    assert pruned.shape == expected.shape and not torch.allclose(pruned, expected)
    torch.testing.assert_close(tiny_unet(**inputs).sample, expected, atol=0, rtol=0)


def test_capture_is_off_outside_the_context(pipe):
    runner = ac.apply(pipe, "uniform")
    with runner.capture_kept_tokens() as kept:
        _sample(pipe, steps=1)
    assert len(kept) == 11
    kept.clear()
    _sample(pipe, steps=1)
    assert kept == {}


def test_stable_diffusion_pipeline():
    pipe = tiny_sd15_pipeline()
    generator = torch.Generator().manual_seed(0)
    expected = pipe("a cat", num_inference_steps=3, height=128, width=128, generator=generator,
                    output_type="latent").images
    runner = ac.apply(pipe, "atedm", keep_ratio=0.5)
    generator = torch.Generator().manual_seed(0)
    out = pipe("a cat", num_inference_steps=3, height=128, width=128, generator=generator,
               output_type="latent").images
    assert [c.phase for c in runner.calls] == ["prune-less", "pruned", "pruned"]
    assert out.shape == expected.shape and not torch.allclose(out, expected)


def test_tome_baseline_runs_in_the_same_schedules(pipe):
    from atedm_compile.passes import ToMeConfig

    expected = _sample(pipe)
    runner = ac.apply(pipe, "atedm", ToMeConfig(destination="fixed"), keep_ratio=0.5)
    out = _sample(pipe)
    assert [c.phase for c in runner.calls] == ["prune-less", "pruned", "pruned", "pruned"]
    assert out.shape == expected.shape and not torch.allclose(out, expected)
    with pytest.raises(ValueError, match="merge ratio"):
        ac.apply(pipe, "uniform", ToMeConfig(), keep_ratio=0.2).start(1)


@pytest.mark.parametrize("schedule", ["atedm", "explicit"])
def test_a_scheduler_swapped_in_after_apply_is_followed(pipe, schedule):
    # The diffusers habit: apply, then pipe.scheduler = OtherScheduler.from_config(...).
    expected_phases = ["prune-less", "pruned", "pruned", "pruned"]
    runner = ac.apply(pipe, ac.make_schedule("atedm", 4) if schedule == "explicit" else "atedm")
    reference = _sample(pipe)
    old = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(old.config)
    out = _sample(pipe)
    assert [(c.step, c.phase) for c in runner.calls] == list(enumerate(expected_phases))
    torch.testing.assert_close(out, reference, atol=0, rtol=0)  # same scheduler class and config: same image
    assert "step" not in old.__dict__  # the old scheduler is let go
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(old.config)
    _sample(pipe)
    assert [(c.step, c.phase) for c in runner.calls] == list(enumerate(expected_phases))
    ac.remove(pipe)
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_bad_config_and_schedule_types_are_refused(pipe):
    with pytest.raises(ValueError, match="config=.gwpr. is not a PruningConfig, a ToMeConfig or a ToDoConfig"):
        ac.apply(pipe, "atedm", "gwpr")
    with pytest.raises(ValueError, match="schedule=4 is not a preset name or a Schedule"):
        ac.apply(pipe, 4)
    assert ac.runner_of(pipe) is None


def test_level2_preset_blocks_match_the_eager_reference_at_their_levels_ratios(tiny_unet):
    # One pruned step of the whole U-Net under atedm-level2 at keep 0.01: a level-2 block runs at
    # 2 sqrt(0.01) = 0.2 (51 of 256 tokens), the mid block at 0.01 (1 of 64); each block's output
    # is the independent eager reference's on the input it saw.
    blocks = {"down1.L": (tiny_unet.down_blocks[1].attentions[1], 0.2), "mid": (tiny_unet.mid_block.attentions[0], 0.01)}
    seen = {}
    hooks = [module.register_forward_hook(
        lambda m, args, kwargs, out, name=name: seen.__setitem__(name, (args[0], kwargs["encoder_hidden_states"],
                                                                        out[0])), with_kwargs=True)
        for name, (module, _) in blocks.items()]
    runner = ac.apply(tiny_unet, "atedm-level2", keep_ratio=0.01)
    try:
        runner.start(1)
        with torch.no_grad():
            tiny_unet(**unet_inputs(tiny_unet, 2, 32, 32, device="cpu"))
    finally:
        ac.remove(tiny_unet)
        for hook in hooks:
            hook.remove()
    for name, (module, keep) in blocks.items():
        x, text, out = seen[name]
        expected, index = pruned_block(module, x, text, keep_ratio=keep, recovery="merge-delta",
                                       similarity="key-cosine", cell=3, fill="distinct")
        assert index.shape == (2, {"down1.L": 51, "mid": 1}[name])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
