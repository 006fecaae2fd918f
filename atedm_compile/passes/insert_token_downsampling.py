"""Pass: ToDo (Smith et al. 2024), a peer method: the self-attention of every layer of a block takes
its keys and values from a downsampled copy of its input; queries stay at full resolution."""

from __future__ import annotations

import torch.fx as fx

from ..config import MAX_DOWNSAMPLE_FACTOR, ToDoConfig, check_number
from ..modules import TokenDownsample
from ..roles import BLOCK_INPUT
from ..tracing import finalize, layer_indices, node_with_role, open_layer, sublayer_call

MODULE = "todo_downsample"


def insert_token_downsampling(
    gm: fx.GraphModule,
    factor: float | None = None,
    config: ToDoConfig = ToDoConfig(),
    block_name: str = "",
) -> fx.GraphModule:
    """Open every layer of a traced block and give each self-attention (``attn1``) the downsampled
    copy of its input (the ``norm1`` output, on the grid of the block input) as
    ``encoder_hidden_states``: its keys and values come from there, its queries from the full input.

    Args:
        gm: a block traced by ``tracing.trace_block``.
        factor: the downsampling factor of each side, >= 1; ``None`` takes ``config.factor``.
        config: the method (``nearest`` or ``avg``); which levels it applies to is the runner's
            choice (``ToDoConfig.applies_to``).
        block_name: for messages and the inserted module's ``repr``.

    Adds one module, ``todo_downsample``, called once per layer. Returns the graph unchanged at
    factor 1 or when the block already downsamples.

    Example:
        >>> import torch
        >>> from atedm_compile.models import build_unet
        >>> from atedm_compile.tracing import trace_block
        >>> unet = build_unet("tiny")
        >>> gm = insert_token_downsampling(trace_block(unet.down_blocks[1].attentions[0]), 2)
        >>> gm(torch.randn(1, 64, 16, 16), torch.randn(1, 77, 64))[0].shape
        torch.Size([1, 64, 16, 16])
    """
    factor = config.factor if factor is None else factor
    check_number("factor", factor, 1, MAX_DOWNSAMPLE_FACTOR)
    if factor == 1 or any(name == MODULE for name, _ in gm.named_children()):
        return gm
    grid = node_with_role(gm, BLOCK_INPUT)
    if grid is None:
        raise ValueError(f"graph has no block input (role {BLOCK_INPUT!r}): trace it with tracing.trace_block")
    gm.add_submodule(MODULE, TokenDownsample(factor, config.method, block_name))
    graph = gm.graph
    for index in layer_indices(gm):
        open_layer(gm, index, block_name or "block")
        attn1 = sublayer_call(gm, f"transformer_blocks.{index}.attn1")
        with graph.inserting_before(attn1):
            keys_values = graph.call_module(MODULE, (attn1.args[0], grid))
        attn1.kwargs = {**attn1.kwargs, "encoder_hidden_states": keys_values}
    return finalize(gm)
