"""The runner inside real diffusers use: every scheduler, partial schedules, copies, compile,
offload, LoRA, attention processors, pipelines sharing a U-Net. Each case also checks that
``remove`` gives back exactly what was there."""

import copy
import inspect
import io
import pickle
import warnings

import diffusers
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)

import atedm_compile as ac
from atedm_compile.flops import unet_inputs
from atedm_compile.models import tiny_sdxl_pipeline

SIZE = 64  # latent 8: level-2 blocks hold 16 tokens, level 3 4


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sdxl_pipeline()
    pipe.original_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(autouse=True)
def _clean(pipe):
    state = _unet_state(pipe.unet)
    yield
    ac.remove(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    assert _unet_state(pipe.unet) == state


def _unet_state(unet):
    """What apply touches and remove must give back: instance attributes of the U-Net and every
    block, and the U-Net's hook lists."""
    blocks = {b.path: dict(vars(unet.get_submodule(b.path))) for b in ac.attention_blocks(unet)}
    # torch.compile marks a module it wrapped (_is_torch_compile): not ours to give back.
    return ({k: v for k, v in vars(unet).items() if k != "_is_torch_compile"}, blocks,
            dict(unet._forward_pre_hooks), dict(unet._forward_hooks))


def _sample(pipe, steps=3, seed=0, size=SIZE, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=steps, height=size, width=size, generator=generator,
                output_type="latent", **kwargs).images


def _steps(runner):
    return [(c.step, c.phase) for c in runner.calls]


# -- 1. every scheduler: seeds, eta, custom timesteps and sigmas pass through untouched --------------


def _scheduler_cases():
    cases = []
    for name in sorted(n for n in dir(diffusers.schedulers) if n.endswith("Scheduler")):
        cases.append(pytest.param(getattr(diffusers.schedulers, name), {}, id=name))
    # SD's own PNDM setting (the default, with Runge-Kutta warm-up steps, fails in this pipeline unapplied)
    cases.append(pytest.param(diffusers.PNDMScheduler, {"skip_prk_steps": True}, id="PNDMScheduler-skip_prk_steps"))
    return cases


def _variants(scheduler):
    set_timesteps = inspect.signature(scheduler.set_timesteps).parameters
    step = inspect.signature(scheduler.step).parameters
    variants = [("seeded", {})]
    if "eta" in step:
        variants.append(("eta", {"eta": 0.7}))
    if "timesteps" in set_timesteps:
        variants.append(("timesteps", {"timesteps": [999, 600, 200]}))
    if "sigmas" in set_timesteps:
        variants.append(("sigmas", {"sigmas": [10.0, 3.0, 0.5]}))
    return variants


# Variants known to run unapplied in this pipeline: the sweep must have compared them.
_MUST_RUN = {"EulerDiscreteScheduler": {"timesteps", "sigmas"}, "DDIMScheduler": {"eta"},
             "TCDScheduler": {"eta", "timesteps"}, "DDPMScheduler": {"timesteps"}}


@pytest.mark.parametrize("scheduler_class,options", _scheduler_cases())
def test_schedule_none_is_bit_equal_for_every_scheduler(pipe, scheduler_class, options):
    try:
        pipe.scheduler = scheduler_class.from_config(pipe.original_scheduler_config, **options)
        _sample(pipe, steps=3)
    except Exception as error:  # noqa: BLE001 - a scheduler this pipeline cannot use at all
        pytest.skip(f"{scheduler_class.__name__} does not run in the SD-XL pipeline here: {error}"[:300])
    compared = set()
    for name, kwargs in _variants(pipe.scheduler):
        steps = None if {"timesteps", "sigmas"} & set(kwargs) else 3
        try:
            expected = _sample(pipe, steps=steps, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. custom sigmas this scheduler refuses, applied or not
            continue
        runner = ac.apply(pipe, "none")
        got = _sample(pipe, steps=steps, **kwargs)
        ac.remove(pipe)
        assert torch.equal(got, expected), f"{scheduler_class.__name__} {name}"
        # The scheduler's own index gives each call's step: the loop index over its order.
        order = pipe.scheduler.order
        loop = len(pipe.scheduler.timesteps)
        assert [c.step for c in runner.calls] == [i // order for i in range(loop)], name
        assert runner.num_steps == -(-loop // order)
        assert torch.equal(_sample(pipe, steps=steps, **kwargs), expected), f"after remove: {name}"
        compared.add(name)
    assert "seeded" in compared
    assert _MUST_RUN.get(scheduler_class.__name__, set()) <= compared


def test_a_stochastic_scheduler_keeps_its_generator(pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.original_scheduler_config)
    ac.apply(pipe, "none")
    first, again, other = _sample(pipe, seed=3), _sample(pipe, seed=3), _sample(pipe, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


# -- 2. partial schedules: a step keeps its position in the full schedule --------------------------


def _atedm(num_steps, steps):
    schedule = ac.make_schedule("atedm", num_steps)
    return [(step, schedule.phase_at(step).name) for step in steps]


def test_img2img_runs_the_last_steps_of_the_schedule(pipe):
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    runner = ac.apply(pipe, "atedm")
    image = torch.rand(1, 3, SIZE, SIZE)
    img2img("a red square", image=image, strength=0.3, num_inference_steps=20, output_type="latent")
    assert _steps(runner) == _atedm(20, range(14, 20))  # all pruned: the prune-less steps are 0..5
    img2img("a red square", image=image, strength=0.8, num_inference_steps=10, output_type="latent")
    assert _steps(runner) == _atedm(10, range(2, 10))
    assert [p for _, p in _steps(runner)][:2] == ["prune-less", "pruned"]


def test_inpaint_at_half_strength(pipe):
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    runner = ac.apply(pipe, "atedm")
    image, mask = torch.rand(1, 3, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    inpaint("a red square", image=image, mask_image=mask, strength=0.5, num_inference_steps=10, height=SIZE,
            width=SIZE, output_type="latent")
    assert _steps(runner) == _atedm(10, range(5, 10))


def test_base_and_refiner_split_one_schedule(pipe):
    runner = ac.apply(pipe, "atedm")
    latents = _sample(pipe, steps=10, denoising_end=0.8)
    assert _steps(runner) == _atedm(10, range(8))
    refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    refiner("a red square", image=latents, num_inference_steps=10, denoising_start=0.8, output_type="latent")
    assert _steps(runner) == _atedm(10, range(8, 10))  # the refiner's last 20%: all pruned


@pytest.mark.parametrize("scheduler_class", [HeunDiscreteScheduler, KDPM2DiscreteScheduler])
def test_second_order_schedulers_run_both_calls_of_a_step_in_its_phase(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.original_scheduler_config)
    runner = ac.apply(pipe, "atedm")
    _sample(pipe, steps=4)
    assert _steps(runner) == _atedm(4, [0, 0, 1, 1, 2, 2, 3])
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    img2img("a red square", image=torch.rand(1, 3, SIZE, SIZE), strength=0.5, num_inference_steps=4,
            output_type="latent")
    assert [s for s, _ in _steps(runner)] == [2, 2, 3]


def test_an_interrupted_run_and_the_next_one(pipe):
    runner = ac.apply(pipe, "atedm")

    def stop_after_two(pipeline, step, timestep, kwargs):
        if step == 1:
            pipeline._interrupt = True
        return kwargs

    _sample(pipe, steps=6, callback_on_step_end=stop_after_two)
    assert _steps(runner) == _atedm(6, range(2))
    _sample(pipe, steps=6)
    assert _steps(runner) == _atedm(6, range(6))


def test_a_pipeline_sharing_the_unet_with_its_own_scheduler(pipe):
    other = StableDiffusionXLImg2ImgPipeline.from_pipe(
        pipe, scheduler=DPMSolverMultistepScheduler.from_config(pipe.original_scheduler_config))
    text2img = diffusers.StableDiffusionXLPipeline.from_pipe(
        pipe, scheduler=DPMSolverMultistepScheduler.from_config(pipe.original_scheduler_config))
    runner = ac.apply(pipe, "atedm")
    _sample(pipe, steps=4)
    assert _steps(runner) == _atedm(4, range(4))
    _sample(text2img, steps=10)
    assert _steps(runner) == _atedm(10, range(10))
    other("a red square", image=torch.rand(1, 3, SIZE, SIZE), strength=0.5, num_inference_steps=8,
          output_type="latent")
    assert _steps(runner) == _atedm(8, range(4, 8))
    _sample(pipe, steps=4)
    assert _steps(runner) == _atedm(4, range(4))


def test_controlnet(pipe):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    control = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 3, SIZE, SIZE)
    generator = torch.Generator().manual_seed(0)
    expected = control("a red square", image=condition, num_inference_steps=4, generator=generator,
                       output_type="latent").images
    runner = ac.apply(pipe, "atedm")
    generator = torch.Generator().manual_seed(0)
    out = control("a red square", image=condition, num_inference_steps=4, generator=generator,
                  output_type="latent").images
    assert _steps(runner) == _atedm(4, range(4))
    assert out.shape == expected.shape and not torch.allclose(out, expected)
    ac.remove(pipe)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(control("a red square", image=condition, num_inference_steps=4, generator=generator,
                               output_type="latent").images, expected)


# -- 3. remove restores what something else put on the U-Net ---------------------------------------


def test_compiled_after_apply_is_removed_through_the_wrapper(pipe):
    expected = _sample(pipe)
    unet = pipe.unet
    runner = ac.apply(pipe, "atedm")
    pruned = _sample(pipe)
    pipe.unet = torch.compile(unet, backend="eager")
    try:
        assert ac.runner_of(pipe) is runner
        # Dynamo's graph of the merge's one-hot product sums in another order: 1.1e-5 seen on
        # values up to 7 (relative 1.6e-6).
        torch.testing.assert_close(_sample(pipe), pruned, atol=5e-5, rtol=0)
        assert _steps(runner) == _atedm(3, range(3))
        ac.remove(pipe)
        assert ac.runner_of(pipe) is None and ac.runner_of(unet) is None
        torch.testing.assert_close(_sample(pipe), expected, atol=1e-5, rtol=0)
    finally:
        pipe.unet = unet


@pytest.mark.slow  # 17 s: torch.compile; compiling after apply stays in the default run
def test_compiled_before_apply_keeps_its_forward(pipe):
    unet = pipe.unet
    expected = _sample(pipe)
    compiled = torch.compile(unet, backend="eager")
    pipe.unet = compiled
    try:
        forward = vars(compiled)["forward"]
        runner = ac.apply(pipe, "atedm")
        assert runner.unet is unet
        _sample(pipe)
        assert _steps(runner) == _atedm(3, range(3))
        ac.remove(pipe)
        assert vars(compiled)["forward"] is forward
        torch.testing.assert_close(_sample(pipe), expected, atol=1e-5, rtol=0)
    finally:
        pipe.unet = unet


@pytest.mark.parametrize("order", ["offload first", "apply first"])
def test_accelerate_hooks_stay_and_come_off_by_their_owner(pipe, order):
    from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module

    unet = pipe.unet
    expected = _sample(pipe)
    if order == "offload first":
        add_hook_to_module(unet, CpuOffload(execution_device="cpu"))
        runner = ac.apply(pipe, "atedm")
    else:
        runner = ac.apply(pipe, "atedm")
        add_hook_to_module(unet, CpuOffload(execution_device="cpu"))
    offloaded = vars(unet)["forward"]
    _sample(pipe)
    assert _steps(runner) == _atedm(3, range(3))
    ac.remove(pipe)
    assert vars(unet)["forward"] is offloaded and hasattr(unet, "_hf_hook")
    assert torch.equal(_sample(pipe), expected)
    remove_hook_from_module(unet)
    assert torch.equal(_sample(pipe), expected)
    vars(unet).pop("forward")  # accelerate leaves the bound method it had kept: its own habit


def test_enable_model_cpu_offload_either_side_of_apply():
    from atedm_compile.forwards import InstanceForward

    pipe = tiny_sdxl_pipeline()
    expected = _sample(pipe)
    ac.apply(pipe, "atedm")
    pruned = _sample(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # after apply
    assert torch.equal(_sample(pipe), pruned)
    ac.remove(pipe)

    def offloaded_only():  # the pipeline puts its offload hooks on again after every call
        forward = vars(pipe.unet)["forward"]
        return hasattr(pipe.unet, "_hf_hook") and not isinstance(forward, InstanceForward)

    assert offloaded_only() and torch.equal(_sample(pipe), expected)
    runner = ac.apply(pipe, "atedm")  # and before it
    assert torch.equal(_sample(pipe), pruned) and _steps(runner) == _atedm(3, range(3))
    ac.remove(pipe)
    assert offloaded_only() and torch.equal(_sample(pipe), expected)


def test_runner_compile_puts_back_the_forward_it_replaced(pipe):
    from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module

    unet = pipe.unet
    add_hook_to_module(unet, CpuOffload(execution_device="cpu"))
    offloaded = vars(unet)["forward"]
    try:
        ac.apply(pipe, "atedm").compile(backend="eager", fullgraph=False)
        assert vars(unet)["forward"] is not offloaded
        assert list(inspect.signature(unet.forward).parameters)[:3] == ["sample", "timestep", "encoder_hidden_states"]
        ac.remove(pipe)
        assert vars(unet)["forward"] is offloaded
    finally:
        remove_hook_from_module(unet)
        vars(unet).pop("forward")


def test_a_block_wrapped_after_apply_is_passed_through_on_remove(pipe):
    expected = _sample(pipe)
    ac.apply(pipe, "uniform", keep_ratio=0.5)
    block = pipe.unet.get_submodule("down_blocks.1.attentions.0")
    ours = vars(block)["forward"]

    def wrapper(*args, **kwargs):  # someone else's hook, put on after apply
        return ours(*args, **kwargs)

    vars(block)["forward"] = wrapper
    try:
        with pytest.warns(UserWarning, match="block down1.F was wrapped by function after apply; AT-EDM is off"):
            ac.remove(pipe)
        assert vars(block)["forward"] is wrapper
        assert torch.equal(_sample(pipe), expected)  # its pass-through runs the block as it was
    finally:
        del vars(block)["forward"]


def test_block_forwards_keep_their_signature(pipe):
    ac.apply(pipe, "atedm")
    for block in ac.attention_blocks(pipe.unet):
        module = pipe.unet.get_submodule(block.path)
        assert inspect.signature(module.forward) == inspect.signature(type(module).forward.__get__(module))


# -- 4. copies ------------------------------------------------------------------------------------


def _pruned_call(unet, inputs):
    runner = ac.runner_of(unet)
    runner.start(4)
    runner.use_phase("pruned")
    return unet(**inputs).sample


def test_a_deep_copy_is_an_independent_applied_unet(pipe):
    inputs = unet_inputs(pipe.unet, 2, 8, 8, device="cpu")
    ac.apply(pipe, "atedm")
    before = _pruned_call(pipe.unet, inputs)
    twin = copy.deepcopy(pipe.unet)
    assert ac.runner_of(twin) is not ac.runner_of(pipe) and ac.runner_of(twin).unet is twin
    torch.testing.assert_close(_pruned_call(twin, inputs), before, atol=0, rtol=0)
    twin_graphs = list(ac.runner_of(twin).built_graphs().values())
    assert {id(m) for g in twin_graphs for m in g.modules()}.isdisjoint(id(m) for m in pipe.unet.modules())
    with torch.no_grad():
        for block in twin.modules():
            if isinstance(block, diffusers.models.attention.FeedForward):
                for p in block.parameters():
                    p.zero_()
    assert not torch.allclose(_pruned_call(twin, inputs), before)
    torch.testing.assert_close(_pruned_call(pipe.unet, inputs), before, atol=0, rtol=0)
    ac.remove(twin)
    assert ac.runner_of(pipe) is not None


def test_a_deep_copied_pipeline_samples_like_the_original(pipe):
    runner = ac.apply(pipe, "atedm")
    expected = _sample(pipe, steps=4)
    twin = copy.deepcopy(pipe)
    got = _sample(twin, steps=4)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert _steps(ac.runner_of(twin)) == _atedm(4, range(4)) and ac.runner_of(twin) is not runner


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_an_applied_unet_pickles(pipe, how):
    inputs = unet_inputs(pipe.unet, 2, 8, 8, device="cpu")
    ac.apply(pipe, "atedm")
    expected = _pruned_call(pipe.unet, inputs)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(pipe.unet))
    else:
        buffer = io.BytesIO()
        torch.save(pipe.unet, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # our own object, made in this test
    torch.testing.assert_close(_pruned_call(loaded, inputs), expected, atol=0, rtol=0)
    assert ac.runner_of(loaded).unet is loaded


# -- 5. LoRA (peft) ---------------------------------------------------------------------------------

LORA_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"], "proj": ["proj_in", "proj_out"]}


def _add_lora(unet, targets, name="default"):
    from peft import LoraConfig

    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                     adapter_name=name)


def _merged_reference(unet, plain):
    """``plain`` (a copy of the U-Net without LoRA) with every LoRA layer's delta (at its current
    adapter weights) added to its weight."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(plain)
    with torch.no_grad():
        for path, layer in unet.named_modules():
            if isinstance(layer, LoraLayer):
                weight = merged.get_submodule(path).weight
                weight += sum(layer.get_delta_weight(a) for a in layer.active_adapters)
    return merged


def _pruned_reference(unet, inputs):
    ac.apply(unet, "atedm")
    try:
        return _pruned_call(unet, inputs)
    finally:
        ac.remove(unet)


@pytest.mark.parametrize("targets", ["attention", "proj"])
@pytest.mark.parametrize("when", ["before apply", "after apply", "after the first call"])
def test_lora_counts_in_every_pruned_block(targets, when):
    unet = tiny_sdxl_pipeline().unet
    plain = copy.deepcopy(unet)
    inputs = unet_inputs(unet, 2, 8, 8, device="cpu")
    without = _pruned_reference(plain, inputs)
    if when == "before apply":
        _add_lora(unet, LORA_TARGETS[targets])
    ac.apply(unet, "atedm")
    if when == "after apply":
        _add_lora(unet, LORA_TARGETS[targets])
    if when == "after the first call":
        _pruned_call(unet, inputs)
        _add_lora(unet, LORA_TARGETS[targets])
    reference = _pruned_reference(_merged_reference(unet, plain), inputs)
    assert not torch.allclose(reference, without, atol=1e-3)
    torch.testing.assert_close(_pruned_call(unet, inputs), reference, atol=1e-5, rtol=1e-5)

    unet.disable_lora()
    torch.testing.assert_close(_pruned_call(unet, inputs), without, atol=1e-5, rtol=1e-5)
    unet.enable_lora()
    unet.set_adapters(["default"], weights=[0.5])
    half = _pruned_reference(_merged_reference(unet, plain), inputs)
    assert not torch.allclose(half, reference, atol=1e-3)
    torch.testing.assert_close(_pruned_call(unet, inputs), half, atol=1e-5, rtol=1e-5)
    unet.set_adapters(["default"], weights=[1.0])
    unet.fuse_lora()
    torch.testing.assert_close(_pruned_call(unet, inputs), reference, atol=1e-5, rtol=1e-5)
    unet.unfuse_lora()
    unet.unload_lora()
    torch.testing.assert_close(_pruned_call(unet, inputs), without, atol=1e-5, rtol=1e-5)
    ac.remove(unet)


# -- 6. attention processors -------------------------------------------------------------------------


class _Counting(diffusers.models.attention_processor.AttnProcessor2_0):
    """A user's processor: plain attention, plus a count of its calls."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def test_a_custom_processor_on_the_first_layer_leaves_its_block_unpruned(pipe):
    runner = ac.apply(pipe, "uniform", keep_ratio=0.5)
    block = pipe.unet.get_submodule("down_blocks.1.attentions.0")
    original = block.transformer_blocks[0].attn1.processor
    block.transformer_blocks[0].attn1.set_processor(_Counting())
    try:
        _Counting.calls = 0
        with runner.capture_kept_tokens() as kept, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _sample(pipe, steps=3)
        assert _Counting.calls == 3  # every call of the layer, one per step
        assert "down1.F" not in kept and "down1.L" in kept
        named = [w for w in caught if "down1.F runs unpruned" in str(w.message) and "_Counting" in str(w.message)]
        assert len(named) == 1
    finally:
        block.transformer_blocks[0].attn1.set_processor(original)


def test_pag_runs_every_call_of_its_processors(pipe):
    from diffusers import StableDiffusionXLPAGPipeline
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    pag = StableDiffusionXLPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid", "down_blocks.1.attentions.0.transformer_blocks.1"])
    pag.set_progress_bar_config(disable=True)
    counts = []
    call = PAGCFGIdentitySelfAttnProcessor2_0.__call__

    def counting(self, *args, **kwargs):
        counts[-1] += 1
        return call(self, *args, **kwargs)

    PAGCFGIdentitySelfAttnProcessor2_0.__call__ = counting
    try:
        for applied in (False, True):
            counts.append(0)
            if applied:
                runner = ac.apply(pipe, "atedm")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _sample(pag, steps=3, pag_scale=3.0)
    finally:
        PAGCFGIdentitySelfAttnProcessor2_0.__call__ = call
    assert counts[0] > 0 and counts[1] == counts[0]
    assert _steps(runner) == _atedm(3, range(3))


def test_a_bare_unet_still_takes_the_step_it_is_given(pipe):
    unet = pipe.unet
    inputs = unet_inputs(unet, 2, 8, 8, device="cpu")
    runner = ac.apply(unet, "atedm")
    runner.start(10)
    runner.set_step(5)
    unet(**inputs)
    assert _steps(runner) == [(5, "pruned")]
    with pytest.raises(ValueError, match="outside this schedule's steps"):
        runner.set_step(10)
