"""The accelerator's code paths, forced on the CPU: the chunked attention map inside pruned blocks,
graphs with no host synchronisation, low-precision graphs, models built on the meta device."""

import pytest
import torch

import atedm_compile as ac
from atedm_compile import ops
from atedm_compile.config import DEFAULT_PRUNING, PruningConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.models import build_unet, initialise_on
from atedm_compile.passes import ToMeConfig, pruning_passes, run_passes
from atedm_compile.tracing import trace_block
from counting_backend import CountingBackend

CONFIGS = {
    "gwpr, similarity": PruningConfig(),
    "gwpr rms, key-cosine": PruningConfig(head_reduction="rms", similarity="key-cosine"),
    "ca-entropy, zeros": PruningConfig(scorer="ca-entropy", recovery="zeros"),
    "gwpr, interpolation, before-ff": PruningConfig(recovery="interpolation", prune_point="before-ff"),
    "gwpr, direct-copy": PruningConfig(recovery="direct-copy"),
    "default: cells, distinct, delta": DEFAULT_PRUNING,
    "cells by score, layer-delta": PruningConfig(recovery="layer-delta", cell=2),
}


def _pruned(block, config, keep=0.37):
    return run_passes(trace_block(block), pruning_passes(keep, config))


def _run_capturing(gm, inputs):
    selector = gm.get_submodule("atedm_selector")
    selector.capture = {}
    try:
        with torch.no_grad():
            (out,) = gm(*inputs)
        return out, selector.capture[""]
    finally:
        selector.capture = None


@pytest.mark.parametrize("name", CONFIGS)
def test_forced_accelerator_path_of_a_pruned_block_equals_the_cpu_path(level2_block, block_inputs, name):
    gm = _pruned(level2_block, CONFIGS[name])
    with ops.attention_path("per-head"):
        expected, expected_index = _run_capturing(gm, block_inputs)
    with ops.attention_path("chunked"):
        out, index = _run_capturing(gm, block_inputs)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [*CONFIGS, "ToMe"])
def test_pruned_block_has_no_host_synchronisation(level2_block, block_inputs, name):
    # fullgraph: an .item(), a nonzero or a Python branch on a tensor's value breaks the graph,
    # and a break is an error here. The graph takes the accelerator's path (auto under compile).
    torch._dynamo.reset()
    gm = _pruned(level2_block, CONFIGS.get(name, ToMeConfig()))
    with ops.attention_path("per-head"), torch.no_grad():
        (expected,) = gm(*block_inputs)
    backend = CountingBackend()
    with torch.no_grad():
        (out,) = torch.compile(gm, backend=backend, fullgraph=True)(*block_inputs)
    assert backend.graphs == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [PruningConfig(), DEFAULT_PRUNING], ids=["paper", "default"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_pruned_block_runs_and_stays_finite(level2_block, block_inputs, dtype, config):
    gm = _pruned(level2_block, config)
    inputs = [x.to(dtype) for x in block_inputs]
    level2_block.to(dtype)
    try:
        for path in ("per-head", "chunked"):
            with ops.attention_path(path), torch.no_grad():
                (out,) = gm(*inputs)
            assert out.dtype == dtype and torch.isfinite(out).all(), path
    finally:
        level2_block.float()


def test_bf16_unet_every_phase_finite_and_graphs_follow_a_later_cast():
    unet = build_unet("tiny")
    runner = ac.apply(unet, "atedm", keep_ratio=0.37)
    runner.start(10)
    unet.to(torch.bfloat16)  # after apply: the graphs call the U-Net's own modules
    inputs = unet_inputs(unet, 2, 32, 32, device="cpu", dtype=torch.bfloat16)
    outs = {}
    with torch.no_grad():
        for phase in (None, "prune-less", "pruned"):
            runner.use_phase(phase)
            outs[phase] = unet(**inputs).sample
            assert outs[phase].dtype == torch.bfloat16 and torch.isfinite(outs[phase]).all(), phase
    assert not torch.equal(outs["pruned"], outs[None])


def test_tome_split_is_kept_per_device_and_grid(tiny_unet):
    block = tiny_unet.mid_block.attentions[0]
    gm = run_passes(trace_block(block), pruning_passes(0.5, ToMeConfig()))
    x, text = torch.randn(1, 128, 8, 8), torch.randn(1, 77, 64)
    (first,) = gm(x, text)
    matching = gm.get_submodule("tome_match_0")
    assert list(matching._splits) == [(8, 8, torch.device("cpu"))]
    (again,) = gm(x, text)
    assert torch.equal(first, again)


def test_initialise_on_a_device_from_the_meta_device():
    reference = build_unet("tiny")
    unet = build_unet("tiny", device="meta")
    initialise_on(unet, torch.device("cpu"), torch.bfloat16, seed=3)
    for (name, param), expected in zip(unet.named_parameters(), reference.parameters()):
        assert param.device.type == "cpu" and param.dtype == torch.bfloat16, name
        assert torch.isfinite(param).all(), name
        if param.numel() > 256:  # each layer's own initialisation: the same spread
            assert param.float().std() == pytest.approx(expected.std().item(), rel=0.2), name
    norm = unet.down_blocks[1].attentions[0].norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    out = unet(**unet_inputs(unet, 2, 32, 32, device="cpu", dtype=torch.bfloat16)).sample
    assert torch.isfinite(out).all()
