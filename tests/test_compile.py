"""Compiled mode: one compiled graph per phase, and switching phases compiles nothing again."""

import pytest
import torch

import atedm_compile as ac
from atedm_compile.config import PruningConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.models import TINY_SDXL_UNET, build_unet
from atedm_compile.schedule import Phase, Schedule
from counting_backend import CountingBackend

# One attention block (mid, two layers) keeps dynamo's capture of the whole U-Net to seconds.
MID_ONLY_UNET = {
    **TINY_SDXL_UNET,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32],
    "attention_head_dim": [2, 2],
    "transformer_layers_per_block": [1, 2],
    "layers_per_block": 1,
}
TWO_PHASES = Schedule((Phase("light", 0, 2, (("mid", 0.75),)), Phase("heavy", 2, 4, (("mid", 0.37),))), 4)


@pytest.fixture
def mid_only():
    torch._dynamo.reset()
    unet = build_unet(MID_ONLY_UNET)
    yield unet, unet_inputs(unet, 2, 16, 16, device="cpu")
    ac.remove(unet)


def _eager_outputs(runner, unet, inputs, phases):
    out = {}
    with torch.no_grad():
        for phase in phases:
            runner.use_phase(phase)
            out[phase] = unet(**inputs).sample
    return out


def test_phase_switch_does_not_recompile(mid_only):
    unet, inputs = mid_only
    runner = ac.apply(unet, TWO_PHASES)
    runner.start(4)
    expected = _eager_outputs(runner, unet, inputs, ["light", "heavy"])
    backend = CountingBackend()
    assert runner.compile(backend=backend) is runner
    seen = []
    with torch.no_grad():
        for phase in ["light", "heavy", "light", "heavy", "heavy", "light"]:
            runner.use_phase(phase)
            torch.testing.assert_close(unet(**inputs).sample, expected[phase], atol=1e-5, rtol=1e-5)
            seen.append(backend.graphs)
    assert seen == [1, 2, 2, 2, 2, 2]
    assert [c.phase for c in runner.calls][-6:] == ["light", "heavy", "light", "heavy", "heavy", "light"]


def test_remove_drops_the_compiled_forward(mid_only):
    unet, inputs = mid_only
    runner = ac.apply(unet, TWO_PHASES).compile(backend=CountingBackend())
    assert "forward" in unet.__dict__
    ac.remove(unet)
    assert "forward" not in unet.__dict__
    ac.apply(unet, TWO_PHASES)  # applying again starts uncompiled
    assert "forward" not in unet.__dict__ and runner is not ac.runner_of(unet)


def test_random_scorer_needs_graph_breaks(mid_only):
    unet, _ = mid_only
    runner = ac.apply(unet, TWO_PHASES, PruningConfig(scorer="random"))
    with pytest.raises(ValueError, match="fullgraph=False"):
        runner.compile(backend=CountingBackend())
    runner.compile(backend=CountingBackend(), fullgraph=False)


@pytest.mark.slow
def test_dsap_loop_compiles_each_phase_once(tiny_pipe):
    # The whole pipeline: full model, then a 10-step DSAP run twice, compiled.
    unet = tiny_pipe.unet
    torch._dynamo.reset()
    runner = ac.apply(tiny_pipe, "atedm", keep_ratio=0.37)
    try:
        generator = torch.Generator().manual_seed(0)
        expected = tiny_pipe("a red square", num_inference_steps=10, height=256, width=256, generator=generator,
                             output_type="latent").images
        backend = CountingBackend()
        runner.compile(backend=backend)
        for _ in range(2):
            generator = torch.Generator().manual_seed(0)
            out = tiny_pipe("a red square", num_inference_steps=10, height=256, width=256, generator=generator,
                            output_type="latent").images
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        assert backend.graphs == 2  # prune-less and pruned
        assert [c.phase for c in runner.calls] == ["prune-less"] * 3 + ["pruned"] * 7
    finally:
        ac.remove(unet)
