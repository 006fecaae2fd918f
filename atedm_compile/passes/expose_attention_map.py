"""Pass: compute the first layer's attention explicitly so that its map is a value in the graph."""

from __future__ import annotations

import operator

import torch.fx as fx

from .. import ops, roles
from ..tracing import ROLE, finalize, node_with_role

_WHICH = {"self": roles.SELF_ATTENTION, "cross": roles.CROSS_ATTENTION}  # the attention call to replace


def _check_plain_attention(attn, where: str) -> None:
    plain = {
        "residual_connection": (attn.residual_connection, False),
        "rescale_output_factor": (attn.rescale_output_factor, 1.0),
        "spatial_norm": (attn.spatial_norm, None),
        "group_norm": (attn.group_norm, None),
        "norm_q": (attn.norm_q, None),
        "norm_k": (attn.norm_k, None),
        "norm_cross": (attn.norm_cross, None),
    }
    for field, (value, expected) in plain.items():
        if (value is not None) if expected is None else value != expected:
            raise NotImplementedError(f"{where}: attention with {field}={value!r} is not supported ({expected!r})")


def exposed_map(gm: fx.GraphModule, which: str, how: str) -> fx.Node:
    """The node of the first layer's ``which`` attention map, heads combined by ``how``."""
    node = node_with_role(gm, roles.attention_map(which))
    if node is None:
        raise ValueError(f"the {which}-attention map is not exposed: run expose_attention_map(which={which!r}) first")
    if node.meta["head_reduction"] != how:
        raise ValueError(f"the {which}-attention map is already exposed with head_reduction="
                         f"{node.meta['head_reduction']!r}, not {how!r}")
    return node


def expose_attention_map(gm: fx.GraphModule, which: str = "self", head_reduction: str = "mean") -> fx.GraphModule:
    """Replace the first layer's ``attn1`` (``which="self"``) or ``attn2`` (``"cross"``) call by its
    projections and ``ops.attention_with_map``: the layer's output and its map
    softmax(Q K^T / sqrt(d)) with heads combined by ``head_reduction`` (``mean`` or ``rms``).

    The map comes from the layer's own Q and K, which also make the layer's output, so exposing it
    costs no second projection or Q K^T. Adds nodes with roles ``roles.attention_map(which)``
    ([B, N, M], ``meta["head_reduction"]`` says how) and ``roles.attention_keys(which)`` ([B, M, h*d]).
    Idempotent: a graph whose map is already exposed the same way is returned unchanged.
    """
    if which not in _WHICH:
        raise ValueError(f"which={which!r} is not one of {list(_WHICH)}")
    if head_reduction not in ops.HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction={head_reduction!r} is not one of {list(ops.HEAD_REDUCTIONS)}")
    node = node_with_role(gm, _WHICH[which])
    if node is None:
        if node_with_role(gm, roles.attention_map(which)) is None:
            raise ValueError(f"graph has no first-layer {which}-attention to expose")
        exposed_map(gm, which, head_reduction)
        return gm
    attn = gm.get_submodule(node.target)
    _check_plain_attention(attn, node.target)
    graph = gm.graph
    hidden = node.args[0]
    context = node.kwargs.get("encoder_hidden_states", hidden) if which == "cross" else hidden

    with graph.inserting_before(node):
        query = graph.call_module(f"{node.target}.to_q", (hidden,))
        key = graph.call_module(f"{node.target}.to_k", (context,))
        value = graph.call_module(f"{node.target}.to_v", (context,))
        both = graph.call_function(ops.attention_with_map, (query, key, value, attn.heads, head_reduction))
        mixed = graph.call_function(operator.getitem, (both, 0))
        attention_map = graph.call_function(operator.getitem, (both, 1))
        out = graph.call_module(f"{node.target}.to_out.1", (graph.call_module(f"{node.target}.to_out.0", (mixed,)),))
    attention_map.meta[ROLE] = roles.attention_map(which)
    attention_map.meta["head_reduction"] = head_reduction
    key.meta[ROLE] = roles.attention_keys(which)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return finalize(gm)
