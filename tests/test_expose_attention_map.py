import pytest
import torch

from atedm_compile.passes import expose_attention_map
from atedm_compile.tracing import node_with_role, trace_block

from reference import self_attention_map


SEEN = {}


def _record(value):
    SEEN["value"] = value


def _capture(gm, role):
    node = node_with_role(gm, role)
    with gm.graph.inserting_after(node):
        gm.graph.call_function(_record, (node,))
    gm.recompile()
    return SEEN


@pytest.mark.parametrize("which", ["self", "cross"])
def test_output_unchanged(level2_block, block_inputs, which):
    gm = expose_attention_map(trace_block(level2_block), which=which)
    torch.testing.assert_close(gm(*block_inputs)[0], level2_block(*block_inputs, return_dict=False)[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "rms"])
def test_map_is_the_layers_own_softmax_qk(level2_block, block_inputs, reduction):
    gm = expose_attention_map(trace_block(level2_block), head_reduction=reduction)
    assert node_with_role(gm, "self_attention") is None
    seen = _capture(gm, "self_attention_map")
    gm(*block_inputs)
    combined = seen["value"]  # [B, N, N]
    assert combined.shape == (2, 256, 256)
    hidden = level2_block.proj_in(level2_block.norm(block_inputs[0]).permute(0, 2, 3, 1).reshape(2, 256, 64))
    expected = self_attention_map(level2_block.transformer_blocks[0], hidden, reduction)
    torch.testing.assert_close(combined, expected, atol=1e-6, rtol=1e-5)
    if reduction == "mean":
        torch.testing.assert_close(combined.sum(-1), torch.ones(2, 256), atol=1e-5, rtol=0)


def test_no_second_projection(level2_block):
    gm = expose_attention_map(trace_block(level2_block))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("transformer_blocks.0.attn1.to_q") == 1
    assert calls.count("transformer_blocks.0.attn1.to_k") == 1


def test_idempotent(level2_block):
    once = expose_attention_map(trace_block(level2_block))
    code = once.code
    assert expose_attention_map(once).code == code
    with pytest.raises(ValueError, match="already exposed with head_reduction='mean', not 'rms'"):
        expose_attention_map(once, head_reduction="rms")


def test_bad_which(level2_block):
    with pytest.raises(ValueError, match="which='both'"):
        expose_attention_map(trace_block(level2_block), which="both")
