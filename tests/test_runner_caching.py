"""Cached steps (DeepCache's rule) as part of a schedule: the runner against the DeepCache
package's helper, composed with pruning, and removed exactly."""

import DeepCache as deepcache
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

import atedm_compile as ac
from atedm_compile.caching import step_roles
from atedm_compile.config import DeepCacheConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.models import tiny_sdxl_pipeline

SIZE = 128


@pytest.fixture(scope="module")
def pipe():
    # A pipeline of its own: DeepCache's helper leaves instance-level forwards behind.
    return tiny_sdxl_pipeline()


def _sample(pipe, steps=6, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red cube on a blue background", num_inference_steps=steps, height=SIZE, width=SIZE,
                generator=generator, output_type="latent", **kwargs).images


def _with_package(pipe, cache, steps):
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache.interval, cache_branch_id=cache.branch)
    helper.enable()
    try:
        return _sample(pipe, steps)
    finally:
        helper.disable()


@pytest.mark.parametrize("interval,branch", [(2, 0), (3, 1)])
def test_cached_steps_equal_deepcache(pipe, interval, branch):
    cache = DeepCacheConfig(interval=interval, branch=branch)
    expected = _with_package(pipe, cache, 7)
    runner = ac.apply(pipe, "none", cache=cache)
    try:
        got = _sample(pipe, 7)
        assert [c.role for c in runner.calls] == list(step_roles(cache, 7))
    finally:
        ac.remove(pipe)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - _sample(pipe, 7)).abs().max() > 1e-3  # the cached steps changed the result


def test_cached_and_pruned_steps_equal_deepcache_around_the_pruned_runner(pipe):
    cache = DeepCacheConfig(interval=2, branch=1)
    runner = ac.apply(pipe, "atedm", keep_ratio=0.5)
    try:
        expected = _with_package(pipe, cache, 6)  # the package's helper over the runner's pruned blocks
        expected_calls = [(c.step, c.phase) for c in runner.calls]
    finally:
        ac.remove(pipe)
    runner = ac.apply(pipe, "atedm", keep_ratio=0.5, cache=cache)
    try:
        got = _sample(pipe, 6)
        calls = [(c.step, c.phase, c.role) for c in runner.calls]
    finally:
        ac.remove(pipe)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    roles = step_roles(cache, 6)
    assert calls == [(step, phase, roles[step]) for step, phase in expected_calls]
    assert {"prune-less", "pruned"} == {phase for _, phase, _ in calls} and "cached" in roles


def test_remove_after_caching_is_exact(pipe):
    unet = pipe.unet
    before = (dict(vars(unet)), dict(unet._forward_pre_hooks))
    expected = _sample(pipe, 4)
    ac.apply(pipe, "atedm", cache=DeepCacheConfig(interval=2))
    assert "forward" in vars(unet)
    _sample(pipe, 4)
    ac.remove(pipe)
    assert (dict(vars(unet)), dict(unet._forward_pre_hooks)) == before
    assert torch.equal(_sample(pipe, 4), expected)


def test_a_partial_run_starts_with_a_full_step(pipe):
    cache = DeepCacheConfig(interval=2)
    runner = ac.apply(pipe, "atedm", cache=cache)
    try:
        img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
        img2img("a red cube", image=torch.rand(1, 3, SIZE, SIZE), strength=0.5, num_inference_steps=10,
                output_type="latent")
        roles = step_roles(cache, 10)
        assert roles[5] == "cached"
        assert [(c.step, c.role) for c in runner.calls] == [(5, "full")] + [(s, roles[s]) for s in range(6, 10)]
    finally:
        ac.remove(pipe)


def test_what_cached_steps_refuse(pipe):
    from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module

    with pytest.raises(ValueError, match="is not a DeepCacheConfig"):
        ac.make_schedule("atedm", 10, cache=2)
    runner = ac.apply(pipe, "atedm", cache=DeepCacheConfig())
    try:
        with pytest.raises(ValueError, match="compile.. does not take a schedule with cached steps"):
            runner.compile(backend="eager")
        with pytest.raises(ValueError, match=r"does not take \['down_block_additional_residuals'\]"):
            runner.start(2)
            inputs = unet_inputs(pipe.unet, 2, 8, 8, device="cpu")
            pipe.unet(**inputs, down_block_additional_residuals=(torch.zeros(1),))
    finally:
        ac.remove(pipe)
    add_hook_to_module(pipe.unet, CpuOffload(execution_device="cpu"))
    try:
        with pytest.raises(ValueError, match="apply before adding it"):
            ac.apply(pipe, "atedm", cache=DeepCacheConfig())
        assert ac.runner_of(pipe) is None and "_forward_pre_hooks" in vars(pipe.unet)
        assert not pipe.unet._forward_pre_hooks
    finally:
        remove_hook_from_module(pipe.unet)
        vars(pipe.unet).pop("forward")


def test_linear_forecast_reads_the_line_through_the_last_two_full_steps(pipe):
    from atedm_compile.caching import cached_forward, full_forward

    unet = pipe.unet
    inputs = unet_inputs(unet, 2, 16, 16, device="cpu")
    text, added = inputs["encoder_hidden_states"], inputs["added_cond_kwargs"]
    generator = torch.Generator().manual_seed(3)
    samples = [torch.randn(inputs["sample"].shape, generator=generator) for _ in range(5)]
    timesteps = [999.0, 800.0, 601.0, 400.0, 201.0]

    def run(forecast):
        runner = ac.apply(unet, "none", cache=DeepCacheConfig(interval=2, forecast=forecast))
        try:
            runner.start(5)
            outs = []
            for step, (sample, t) in enumerate(zip(samples, timesteps)):
                runner.set_step(step)
                with torch.no_grad():
                    outs.append(unet(sample, torch.tensor(t), encoder_hidden_states=text, added_cond_kwargs=added).sample)
            assert [c.role for c in runner.calls] == ["full", "cached", "full", "cached", "full"]
            return outs
        finally:
            ac.remove(unet)

    got = run("linear")
    with torch.no_grad():  # by hand: steps 0 and 2 full; 1 reads step 0's features, 3 the line at t = 400
        first, f0 = full_forward(unet, 0, samples[0], timesteps[0], text, added)
        second = cached_forward(unet, 0, f0, samples[1], timesteps[1], text, added)
        third, f2 = full_forward(unet, 0, samples[2], timesteps[2], text, added)
        line = f2 + (timesteps[3] - timesteps[2]) / (timesteps[2] - timesteps[0]) * (f2 - f0)
        fourth = cached_forward(unet, 0, line, samples[3], timesteps[3], text, added)
    for ours, expected in zip(got, [first, second, third, fourth]):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    reused = run("none")
    torch.testing.assert_close(reused[1], got[1], atol=0, rtol=0)  # one full step: nothing to draw a line through
    assert (reused[3] - got[3]).abs().max() > 1e-3


def test_forecast_is_checked():
    with pytest.raises(ValueError, match=r"forecast='quadratic' is not allowed.*\['none', 'linear'\]"):
        DeepCacheConfig(forecast="quadratic")
