"""benchmarks/front.py's pure parts (the envelope and its interpolation, the per-speed-up
statement, the cache key) and benchmarks/peers.py's methods: each changes the tiny pipeline's
output while on and leaves it bit-identical once off."""

import math

import pytest
import torch

from atedm_compile.config import DeepCacheConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.models import tiny_sdxl_pipeline
from benchmarks import front, peers

# -- envelope and interpolation ---------------------------------------------------------------

def test_envelope_keeps_the_points_nothing_beats():
    points = [(1.0, 30.0), (2.0, 25.0), (1.5, 20.0), (3.0, 26.0), (4.0, 10.0)]
    # (1.5, 20) is beaten by (2, 25); (2, 25) by (3, 26), which is faster and better.
    assert front.envelope(points) == [(1.0, 30.0), (3.0, 26.0), (4.0, 10.0)]
    # Lower is better: the same rule on the other side.
    assert front.envelope([(1.0, 5.0), (2.0, 4.0), (3.0, 6.0)], higher_is_better=False) == [(2.0, 4.0), (3.0, 6.0)]


def test_interpolate_is_linear_on_the_envelope_and_none_beyond_the_fastest_point():
    points = [(1.0, 30.0), (2.0, 25.0), (1.5, 20.0), (3.0, 26.0), (4.0, 10.0)]
    assert front.interpolate(points, 1.0) == 30.0
    assert front.interpolate(points, 2.0) == pytest.approx(28.0)  # between (1, 30) and (3, 26), not the 25 measured
    assert front.interpolate(points, 3.5) == pytest.approx(18.0)
    assert front.interpolate(points, 4.01) is None
    assert front.interpolate(points, 0.99) == 30.0  # the slowest point is faster: it serves
    assert front.interpolate(points, 0.99, strict=True) is None
    assert front.interpolate(points, 1.0, strict=True) == 30.0
    assert front.interpolate([(2.0, 7.0)], 2.0) == 7.0
    assert front.interpolate([(2.0, 7.0)], 2.1) is None
    assert front.interpolate([], 2.0) is None
    # Slower than the envelope's slowest point but inside the range: the faster, better point serves.
    assert front.interpolate([(1.0, 10.0), (2.0, 20.0)], 1.5) == 20.0
    assert front.interpolate([(1.0, 5.0), (3.0, 1.0)], 2.0, higher_is_better=False) == 1.0


def _rows():
    return [{"family": "A", "speed_up": 1.0, "psnr": 40.0, "frechet": 1.0},
            {"family": "A", "speed_up": 3.0, "psnr": 30.0, "frechet": 5.0},
            {"family": "B", "speed_up": 2.0, "psnr": 36.0, "frechet": 2.0},
            {"family": "B", "speed_up": 4.0, "psnr": 20.0, "frechet": 4.0}]


def test_leaders_and_statement():
    at = {entry["speed_up"]: entry for entry in front.leaders(_rows(), (0.5, 2.0, 3.5, 5.0))}
    # Below every point: each family's slowest envelope point serves; strictly, nobody is there.
    assert at[0.5]["psnr"]["values"] == {"A": 40.0, "B": 36.0}
    assert front.leaders(_rows(), (0.5,), strict=True)[0]["psnr"]["best"] is None
    # At 2x: A interpolates to 35 dB and 3.0 Frechet; B measured 36 dB and 2.0.
    assert at[2.0]["psnr"]["values"] == pytest.approx({"A": 35.0, "B": 36.0})
    assert (at[2.0]["psnr"]["best"], at[2.0]["psnr"]["runner_up"]) == ("B", "A")
    assert at[2.0]["psnr"]["lead"] == pytest.approx(1.0)
    assert at[2.0]["frechet"]["best"] == "B" and at[2.0]["frechet"]["lead"] == pytest.approx(1.0)
    assert front.statement(at[2.0]) == ("at 2x: by PSNR: B (36.00 dB), 1.00 dB ahead of A; "
                                        "by Frechet: B (2.00), 1.00 ahead of A")
    assert at[3.5]["psnr"]["best"] == "B" and at[3.5]["psnr"]["runner_up"] is None
    assert "the only family there" in front.statement(at[3.5])
    assert front.statement(at[5.0]) == "at 5x: by PSNR: no family reaches it; by Frechet: no family reaches it"


def test_cache_key_follows_weights_settings_and_sampling_not_the_name():
    sampling = {"captions": ["a"], "seeds": [1], "steps": 30, "guidance": 4.0, "size": 128}
    one = peers.deepcache(2)
    key = front.cache_key("w", one, sampling)
    assert key == front.cache_key("w", peers.Method("another name", one.family, one.settings, one.enable), sampling)
    assert key != front.cache_key("v", one, sampling)
    assert key != front.cache_key("w", peers.deepcache(3), sampling)
    assert key != front.cache_key("w", one, {**sampling, "steps": 20})
    assert key != front.cache_key("w", one, {**sampling, "seeds": [2]})


def test_the_default_methods_are_named_once_and_keyed_apart():
    methods = [peers.FULL, *peers.peer_methods(30), *front.our_methods()]
    peers.check_unique(methods)
    keys = {front.cache_key("w", m, {}) for m in methods}
    assert len(keys) == len(methods)
    with pytest.raises(ValueError, match="named twice"):
        peers.check_unique([peers.deepcache(2), peers.deepcache(2)])


# -- every method on, then exactly off ---------------------------------------------------------

STEPS, SIZE = 3, 64


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plain(pipe):
    """The pipeline's sample, a U-Net call's output on random inputs, and which modules carry
    instance-level forwards or hook registries, before any method."""
    torch.manual_seed(0)
    inputs = unet_inputs(pipe.unet, 2, SIZE // 8, SIZE // 8, device="cpu")
    with torch.no_grad():
        output = pipe.unet(**inputs).sample
    return _sample(pipe), inputs, output, _instance_state(pipe.unet)


def _sample(pipe):
    return pipe("a red cube on a blue background", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="latent").images


def _instance_state(unet):
    return {name: sorted(k for k in vars(m) if k in ("forward", "_diffusers_hook")) for name, m in unet.named_modules()}


METHODS = {
    "ToMe L2": lambda: peers.tome(0.5, STEPS, level=2),
    "ToMe all": lambda: peers.tome(0.5, STEPS),
    "ToDo": lambda: peers.todo(2),
    "DeepCache": lambda: peers.deepcache(2),
    "PAB": lambda: peers.pab(2, 2, (0, 1000), num_steps=STEPS),
    "TaylorSeer": lambda: peers.taylorseer(2, warmup=1, num_steps=STEPS),
    "ours + cache": lambda: peers.ours("x", "atedm", None, keep_ratio=0.5, cache=DeepCacheConfig(interval=2)),
}

STATEFUL = ("DeepCache", "PAB", "TaylorSeer")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_changes_the_output_and_comes_off_exactly(pipe, plain, name):
    sample, inputs, output, state = plain
    with METHODS[name]().enable(pipe):
        on = _sample(pipe)
        if name in STATEFUL:
            assert torch.equal(_sample(pipe), on)  # its state starts afresh with each sampling run
    assert not torch.equal(on, sample)
    assert torch.equal(_sample(pipe), sample)
    with torch.no_grad():
        assert torch.equal(pipe.unet(**inputs).sample, output)
    assert _instance_state(pipe.unet) == state


def test_timestep_tracker_follows_the_unet_calls(pipe):
    seen, handles = [], []

    def install(unet, current_timestep):
        handles.append(unet.down_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(current_timestep())))

    with peers._diffusers_hooks(pipe, STEPS, install):
        _sample(pipe)
    handles[0].remove()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert seen == pytest.approx(timesteps)
    assert not math.isnan(seen[0])


def test_speed_up_pairs_each_run_with_the_full_models_run_of_its_round():
    full = {"method": "full model", "seconds": [60.0, 50.0, 40.0], "rounds": [0, 1, 2]}
    method = {"method": "m", "seconds": [30.0, 20.0], "rounds": [0, 2]}
    assert front.paired_speed_up(full, method) == pytest.approx((60 / 30 + 40 / 20) / 2)
    assert front.paired_speed_up(full, full) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"rounds \[5\]"):
        front.paired_speed_up(full, {"method": "m", "seconds": [1.0], "rounds": [5]})
    with pytest.raises(ValueError, match="timings without their rounds"):
        front.paired_speed_up(full, {"method": "m", "seconds": [1.0]})
