"""DeepCache's cached steps: the step rule against the package's, the U-Net split against the plain
U-Net and against ``DeepCacheSDHelper`` on the same pipeline, composition with the runner's
pruned blocks, and the MACs of a cached step."""

import ast
import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from atedm_compile.caching import (
    BranchPosition,
    FEATURES_NAME,
    CachedStep,
    CacheState,
    FullStep,
    branch_position,
    cached_forward,
    cached_step,
    features_shape,
    full_forward,
    full_steps,
    step_roles,
)
from atedm_compile.config import DeepCacheConfig
from atedm_compile.flops import count_cached_steps, unet_inputs
from atedm_compile.models import build_unet, tiny_sd15_pipeline, tiny_sdxl_pipeline, unet_input_shapes
from atedm_compile.runner import apply, remove

deepcache = pytest.importorskip("DeepCache", reason="DeepCache is a test dependency (pip install DeepCache)")


def _inputs(unet, latent: int, batch: int = 2, seed: int = 0):
    shapes = unet_input_shapes(unet.config, batch, latent, latent)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(shapes["sample"], generator=generator)
    text = torch.randn(shapes["encoder_hidden_states"], generator=generator)
    added = {name: torch.randn(shapes[name], generator=generator) for name in ("text_embeds", "time_ids")
             if name in shapes}
    return sample, text, added or None


UNETS = {"tiny": 32, "tiny-sd15": 16}  # name -> latent size


@pytest.fixture(scope="module")
def unets():
    return {name: build_unet(name) for name in UNETS}


# -- the step rule ----------------------------------------------------------------------------


def _package_full_steps_uniform(interval: int, num_steps: int) -> list[int]:
    # The helper decides per block call; a full step is one where even the mid block runs.
    helper = deepcache.DeepCacheSDHelper()
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.reset_states()
    full = []
    for step in range(num_steps):
        helper.cur_timestep = step
        if not helper.is_skip_step(0, 0, blocktype="mid"):
            full.append(step)
    return full


@pytest.mark.parametrize("interval", [1, 2, 3, 4, 5])
def test_uniform_full_steps_are_the_helpers(interval):
    for num_steps in range(1, 41):
        assert list(full_steps(DeepCacheConfig(interval=interval), num_steps)) == \
            _package_full_steps_uniform(interval, num_steps)


def _package_quad_center():
    """``sample_from_quad_center`` from the package's SD pipeline module, which does not import
    on this diffusers (it asks for names diffusers has since removed): the function alone."""
    location = importlib.util.find_spec("DeepCache").submodule_search_locations[0]
    source = (Path(location) / "sd" / "pipeline_stable_diffusion.py").read_text()
    tree = ast.parse(source)
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef)
                   and node.name == "sample_from_quad_center"]
    namespace = {"np": np}
    exec(compile(ast.Module([function], type_ignores=[]), "sample_from_quad_center", "exec"), namespace)
    return namespace["sample_from_quad_center"]


def test_non_uniform_full_steps_are_the_pipelines():
    quad_center = _package_quad_center()
    compared = 0
    for num_steps in (10, 20, 25, 30, 50):
        for interval in (2, 3, 4, 5):
            for center in (0, 5, 9, 15):
                if center >= num_steps:
                    continue
                for power in (1.2, 1.4, 1.6):
                    cache = DeepCacheConfig(interval=interval, spacing="non-uniform", center=center, power=power)
                    # The pipelines' count of full steps: ceil(N / interval).
                    count = num_steps // interval + (num_steps % interval != 0)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # numpy's, on casting the complex points
                            expected, _ = quad_center(num_steps, count, center=center, pow=power)
                    except ValueError:
                        with pytest.raises(ValueError, match="no non-uniform spacing"):
                            full_steps(cache, num_steps)
                        continue
                    compared += 1
                    assert full_steps(cache, num_steps) == tuple(sorted({int(i) for i in expected}))
    assert compared > 150  # most settings have a spacing; the rest must fail as the package's does


def test_interval_one_is_every_step_and_roles_follow_full_steps():
    assert step_roles(DeepCacheConfig(interval=1, spacing="non-uniform"), 7) == ("full",) * 7
    assert step_roles(DeepCacheConfig(interval=3), 7) == ("full", "cached", "cached", "full", "cached", "cached",
                                                          "full")


@pytest.mark.parametrize("fields, message", [
    (dict(interval=0), r"interval=0 is not allowed: must be an integer in \[1, 1000\]"),
    (dict(interval=2.5), r"interval=2.5 is not allowed: must be an integer"),
    (dict(branch=-1), r"branch=-1 is not allowed: must be an integer in \[0, "),
    (dict(spacing="random"), r"spacing='random' is not allowed; choose one of \['uniform', 'non-uniform'\]"),
    (dict(power=1.0), r"power=1.0 is not allowed: must be a number in \(1.0, 100.0\]"),
    (dict(center=-3), r"center=-3 is not allowed"),
])
def test_config_errors_name_the_value_and_what_is_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        DeepCacheConfig(**fields)


def test_step_rule_errors():
    with pytest.raises(ValueError, match=r"center=15 is not allowed for a 10-step run.*\[0, 9\]"):
        full_steps(DeepCacheConfig(spacing="non-uniform", center=15), 10)
    with pytest.raises(ValueError, match=r"num_steps=0 is not allowed"):
        full_steps(DeepCacheConfig(), 0)


# -- the split ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNETS))
def test_full_and_cached_forward_equal_the_plain_unet(unets, name):
    unet = unets[name]
    sample, text, added = _inputs(unet, UNETS[name])
    with torch.no_grad():
        expected = unet(sample, 999.0, text, added_cond_kwargs=added).sample
        for branch in range(3 * len(unet.down_blocks)):
            noise, features = full_forward(unet, branch, sample, 999.0, text, added)
            torch.testing.assert_close(noise, expected, atol=1e-6, rtol=0)
            # Interval 1: the features of this very step make the cached step the full one.
            torch.testing.assert_close(cached_forward(unet, branch, features, sample, 999.0, text, added), expected,
                                       atol=1e-6, rtol=0)


def test_uneven_latent_passes_the_upsample_sizes(unets):
    # 34 x 30 halves to 17 x 15, then 9 x 8: the upsamplers must be told the sizes to go back to.
    unet = unets["tiny"]
    shapes = unet_input_shapes(unet.config, 1, 34, 30)
    generator = torch.Generator().manual_seed(3)
    sample, text = (torch.randn(shapes[name], generator=generator) for name in ("sample", "encoder_hidden_states"))
    added = {name: torch.randn(shapes[name], generator=generator) for name in ("text_embeds", "time_ids")}
    with torch.no_grad():
        expected = unet(sample, 10.0, text, added_cond_kwargs=added).sample
        for branch in range(9):
            noise, features = full_forward(unet, branch, sample, 10.0, text, added)
            assert tuple(features.shape) == features_shape(unet.config, branch, 1, 34, 30)
            torch.testing.assert_close(noise, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(cached_forward(unet, branch, features, sample, 10.0, text, added), expected,
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(UNETS))
def test_features_shape(unets, name):
    unet = unets[name]
    sample, text, added = _inputs(unet, UNETS[name], batch=3)
    with torch.no_grad():
        for branch in range(3 * len(unet.down_blocks)):
            _, features = full_forward(unet, branch, sample, 500.0, text, added)
            assert tuple(features.shape) == features_shape(unet.config, branch, 3, UNETS[name], UNETS[name])
    # The SD-XL base U-Net at 1024 px: branch 0 keeps 320 channels at 128 x 128, branch 8 the mid block's.
    config = build_unet("sdxl-base", device="meta").config
    assert features_shape(config, 0, 2, 128, 128) == (2, 320, 128, 128)
    assert features_shape(config, 2, 2, 128, 128) == (2, 640, 128, 128)
    assert features_shape(config, 5, 2, 128, 128) == (2, 1280, 64, 64)
    assert features_shape(config, 8, 2, 128, 128) == (2, 1280, 32, 32)


def test_branch_errors_name_the_range_of_this_unet(unets):
    assert branch_position(unets["tiny"].config, 4) == BranchPosition(block=1, layer=1)
    sample, text, added = _inputs(unets["tiny"], 32)
    with pytest.raises(ValueError, match=r"branch=9 is not allowed: this U-Net's 3 down stages of 2 layers and a "
                                         r"downsampler give branches 0 to 8"):
        full_forward(unets["tiny"], 9, sample, 999.0, text, added)
    with pytest.raises(ValueError, match=r"branch=6 is not allowed: .* 2 down stages .* branches 0 to 5"):
        CachedStep(unets["tiny-sd15"], 6, ["sample"])
    features = torch.zeros(2, 64, 32, 32)
    with pytest.raises(ValueError, match=r"features of shape \(2, 64, 32, 32\) do not fit branch 0 .*"
                                         r"expected \(2, 32, 32, 32\)"):
        cached_forward(unets["tiny"], 0, features, sample, 999.0, text, added)
    with pytest.raises(RuntimeError, match="before any full step"):
        cached_step(unets["tiny"], 0, False, CacheState(), sample, 999.0, text, added)


def test_step_modules_take_and_give_named_tensors(unets):
    unet = unets["tiny"]
    sample, text, added = _inputs(unet, 32)
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    timestep = torch.tensor(999.0)
    with torch.no_grad():
        noise, features = FullStep(unet, 4, names)(sample, timestep, text, added["text_embeds"], added["time_ids"])
        expected_noise, expected_features = full_forward(unet, 4, sample, timestep, text, added)
        cached = CachedStep(unet, 4, names + [FEATURES_NAME])(sample * 0.9, timestep, text, added["text_embeds"],
                                                              added["time_ids"], features)
        expected = cached_forward(unet, 4, features, sample * 0.9, timestep, text, added)
    assert torch.equal(noise, expected_noise) and torch.equal(features, expected_features)
    assert torch.equal(cached, expected)
    assert dict(CachedStep(unet, 4, names).named_parameters()).keys() == {f"unet.{k}" for k, _ in
                                                                         unet.named_parameters()}


# -- against the package, on a pipeline ----------------------------------------------------------


@pytest.fixture(scope="module")
def pipes():
    # Pipelines of their own: the helper leaves instance-level forwards on every module it wrapped.
    return {"sdxl": (tiny_sdxl_pipeline(), dict(height=256, width=256)),
            "sd15": (tiny_sd15_pipeline(), dict(height=128, width=128))}


def _sample(pipe, size, steps):
    return pipe("a red cube on a blue background", **size, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def _ours(pipe, size, cache: DeepCacheConfig, steps: int):
    unet, roles, state, calls = pipe.unet, step_roles(cache, steps), CacheState(), []

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True, **unused):
        assert not any(v is not None for v in unused.values())
        noise = cached_step(unet, cache.branch, roles[len(calls)] == "full", state, sample, timestep,
                            encoder_hidden_states, added_cond_kwargs)
        calls.append(roles[len(calls)])
        return (noise,)

    unet.forward = forward
    try:
        return _sample(pipe, size, steps), calls
    finally:
        del unet.forward


def _package(pipe, size, cache: DeepCacheConfig, steps: int):
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache.interval, cache_branch_id=cache.branch)
    helper.enable()
    try:
        return _sample(pipe, size, steps)
    finally:
        helper.disable()


def _check_against_package(pipes, kind, interval, branch, steps=7):
    pipe, size = pipes[kind]
    cache = DeepCacheConfig(interval=interval, branch=branch)
    ours, calls = _ours(pipe, size, cache, steps)
    assert calls == list(step_roles(cache, steps))
    torch.testing.assert_close(ours, _package(pipe, size, cache, steps), atol=1e-5, rtol=0)
    assert (ours - _sample(pipe, size, steps)).abs().max() > 1e-3  # cached steps did change the result


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("branch", [0, 1])
def test_cached_sampling_equals_deepcache_helper_sdxl(pipes, interval, branch):
    _check_against_package(pipes, "sdxl", interval, branch)


@pytest.mark.parametrize("interval", [2, 3])
def test_cached_sampling_equals_deepcache_helper_sd15(pipes, interval):
    _check_against_package(pipes, "sd15", interval, 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind, branches", [("sdxl", range(2, 9)), ("sd15", range(6))])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_cached_sampling_equals_deepcache_helper_every_branch(pipes, kind, branches, interval):
    for branch in branches:
        _check_against_package(pipes, kind, interval, branch, steps=11)


@pytest.mark.slow
@pytest.mark.parametrize("interval", [2, 3])
def test_cached_sampling_equals_deepcache_helper_on_tiny_shapes_xl(interval):
    from atedm_compile.models import load_pipeline

    pipe = load_pipeline("tiny-shapes-xl")
    pipe.set_progress_bar_config(disable=True)
    pipes = {"xl": (pipe, dict(height=128, width=128))}
    for branch in (0, 1, 3):
        _check_against_package(pipes, "xl", interval, branch, steps=20)


# -- with the runner's pruned blocks ---------------------------------------------------------------


def test_cached_steps_run_the_pruned_block_graphs():
    unet = build_unet("tiny")
    steps, cache = 6, DeepCacheConfig(interval=3, branch=4)  # branch 4: down1.F, up1.M and up1.L are shallow
    roles = step_roles(cache, steps)
    timesteps = torch.tensor([999.0, 800.0, 600.0, 400.0, 200.0, 1.0])
    inputs = [_inputs(unet, 32, seed=step) for step in range(steps)]
    runner = apply(unet, "atedm", keep_ratio=0.5)
    try:
        runner.start(steps)
        state, ours, kept_in_cached = CacheState(), [], []
        with torch.no_grad():
            for step, (sample, text, added) in enumerate(inputs):
                runner.set_step(step)
                with runner.capture_kept_tokens() as kept:
                    ours.append(cached_step(unet, cache.branch, roles[step] == "full", state, sample,
                                            timesteps[step], text, added))
                if roles[step] == "cached":
                    kept_in_cached.append((runner.phase.name, set(kept)))
        # The eager composition: the package's helper wrapped around the runner's blocks by hand.
        helper = deepcache.DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=SimpleNamespace(
            timesteps=timesteps)))
        helper.set_params(cache_interval=cache.interval, cache_branch_id=cache.branch)
        helper.enable()
        try:
            reference = []
            with torch.no_grad():
                for step, (sample, text, added) in enumerate(inputs):
                    runner.set_step(step)
                    reference.append(unet(sample, timesteps[step], text, added_cond_kwargs=added).sample)
        finally:
            helper.disable()
    finally:
        remove(unet)
    for step in range(steps):
        torch.testing.assert_close(ours[step], reference[step], atol=1e-5, rtol=0)
    # Cached steps ran the pruned graphs of the shallow blocks their phase prunes, and no deep block.
    # Steps 1, 2, 4, 5 are cached; DSAP's prune-less phase (steps 0-1 of 6) leaves down1.F and up1.L alone.
    assert kept_in_cached == [("prune-less", {"up1.M"})] + [("pruned", {"down1.F", "up1.M", "up1.L"})] * 3


# -- MACs -----------------------------------------------------------------------------------------


def _module_flops(unet, latent: int) -> dict[str, int]:
    inputs = unet_inputs(unet, 2, latent, latent, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet(**inputs)
    top = type(unet).__name__  # the whole call, as ""
    return {name[len(top) + 1:]: sum(ops.values()) for name, ops in counter.get_flop_counts().items()
            if name == top or name.startswith(top + ".")}


# The modules a cached step of the tiny SD-XL U-Net runs, by hand from the branch rule.
SHALLOW = {
    0: ["time_embedding", "add_embedding", "conv_in", "up_blocks.2.resnets.2", "conv_out"],
    4: ["time_embedding", "add_embedding", "conv_in", "down_blocks.0", "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.1.resnets.2",
        "up_blocks.1.attentions.2", "up_blocks.1.upsamplers.0", "up_blocks.2", "conv_out"],
}


@pytest.mark.parametrize("branch", sorted(SHALLOW))
def test_cached_step_macs_are_the_sum_of_the_layers_it_runs(branch):
    unet = build_unet("tiny", device="meta")
    parts = _module_flops(unet, 32)
    cost = count_cached_steps(unet, DeepCacheConfig(interval=3, branch=branch), num_steps=10, height=256, width=256)
    assert cost.cached_flops == sum(parts[name] for name in SHALLOW[branch])
    assert cost.full_flops == parts[""]
    assert 0 < cost.cached_flops < cost.full_flops
    assert cost.full_steps == 4  # steps 0, 3, 6, 9
    assert cost.average_tmacs == pytest.approx((4 * cost.full_tmacs + 6 * cost.cached_tmacs) / 10)
    # Its JSON is its own fields (a merge once gave it FlopsReport's, which it does not have).
    assert cost.to_dict() == {**cost.to_dict(), "branch": branch, "interval": 3, "full_steps": 4,
                              "cached_flops": cost.cached_flops}


def test_sdxl_base_cached_step_costs_less():
    unet = build_unet("sdxl-base", device="meta")
    shallow = count_cached_steps(unet, DeepCacheConfig(interval=2, branch=0))
    deeper = count_cached_steps(unet, DeepCacheConfig(interval=2, branch=1))
    assert shallow.full_tmacs == pytest.approx(6.76, abs=0.01)  # the paper's 6.7 TMACs at 1024 px
    assert shallow.cached_tmacs < deeper.cached_tmacs < 0.1 * shallow.full_tmacs
    assert shallow.full_steps == 25 and shallow.average_tmacs == pytest.approx(
        (shallow.full_tmacs + shallow.cached_tmacs) / 2)


@pytest.mark.slow
def test_pruned_full_and_cached_steps_export_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    unet = build_unet("tiny")
    sample, text, added = _inputs(unet, 32)
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    tensors = (sample, torch.tensor(999.0), text, added["text_embeds"], added["time_ids"])
    runner = apply(unet, "uniform", keep_ratio=0.5)
    try:
        runner.start(4)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            full, cached = FullStep(unet, 4, names), CachedStep(unet, 4, names + [FEATURES_NAME])
            torch.onnx.export(full, tensors, str(tmp_path / "full.onnx"), input_names=names,
                              output_names=["latent", FEATURES_NAME], dynamo=False, opset_version=17)
            noise, features = full(*tensors)
            later = (sample * 0.5, *tensors[1:], features)
            torch.onnx.export(cached, later, str(tmp_path / "cached.onnx"), input_names=names + [FEATURES_NAME],
                              output_names=["latent"], dynamo=False, opset_version=17)
            expected = cached(*later)
    finally:
        remove(unet)
    session = onnxruntime.InferenceSession(str(tmp_path / "full.onnx"))
    got_noise, got_features = session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})
    np.testing.assert_allclose(got_noise, noise.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_features, features.numpy(), atol=1e-4)
    session = onnxruntime.InferenceSession(str(tmp_path / "cached.onnx"))
    (got,) = session.run(None, {n: t.numpy() for n, t in zip(names + [FEATURES_NAME], later)})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    # The cached graph holds only the shallow layers' weights.
    assert (tmp_path / "cached.onnx").stat().st_size < 0.3 * (tmp_path / "full.onnx").stat().st_size


def test_cached_step_macs_count_the_pruned_blocks_it_runs():
    unet = build_unet("tiny", device="meta")
    size = dict(num_steps=10, height=256, width=256)
    plain = {branch: count_cached_steps(unet, DeepCacheConfig(branch=branch), **size) for branch in (0, 4)}
    runner = apply(unet, "uniform", keep_ratio=0.5)
    try:
        runner.start(10)
        pruned = {branch: count_cached_steps(unet, DeepCacheConfig(branch=branch), **size) for branch in (0, 4)}
    finally:
        remove(unet)
    # Branch 0's shallow layers hold no attention block; branch 4's hold down1.F, up1.M and up1.L.
    assert pruned[0].cached_flops == plain[0].cached_flops
    assert pruned[4].cached_flops < plain[4].cached_flops
    assert pruned[4].full_flops < plain[4].full_flops
