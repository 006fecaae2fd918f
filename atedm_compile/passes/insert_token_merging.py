"""Pass: ToMe for SD (supp. B.1), the baseline: merge tokens before and unmerge them after the
chosen sub-layers of every layer of a block, as ``tomesd.apply_patch`` does."""

from __future__ import annotations

import torch.fx as fx

from ..config import SUBLAYERS, ToMeConfig, check_merge_ratio
from ..modules import TokenMatching, TokenMerge, TokenUnmerge
from ..roles import BLOCK_INPUT, TOME_MATCHING, TOME_MERGED, TOME_UNMERGED
from ..tracing import ROLE, finalize, layer_indices, node_with_role, open_layer, sublayer_call


def insert_token_merging(
    gm: fx.GraphModule,
    ratio: float | None = None,
    config: ToMeConfig = ToMeConfig(),
    block_name: str = "",
) -> fx.GraphModule:
    """Open every layer of a traced block and wrap each of ``config.sublayers`` in a merge of its
    input and an unmerge of its output; the matching of a layer is computed once from the hidden
    states entering it, on the grid of the block input (``tomesd``'s ``compute_merge``, which
    derives the grid from the latent size and the token count: the same H and W for every latent
    that ``runner.check_latent`` accepts).

    Args:
        gm: a block traced by ``tracing.trace_block``.
        ratio: the merge ratio; ``None`` takes ``config.ratio``.
        config: sub-layers, destinations, cells.
        block_name: for messages and the inserted modules' ``repr``.

    Adds modules ``tome_match_{i}``, ``tome_merge_{i}``, ``tome_unmerge_{i}`` for layer i and nodes
    with roles ``TOME_MATCHING``, ``TOME_MERGED``, ``TOME_UNMERGED``. Returns the graph unchanged
    when the ratio is 0 or the block already merges.

    Example:
        >>> import torch
        >>> from atedm_compile.models import build_unet
        >>> from atedm_compile.tracing import trace_block
        >>> unet = build_unet("tiny")
        >>> gm = insert_token_merging(trace_block(unet.mid_block.attentions[0]), 0.5)
        >>> sample = torch.randn(1, 128, 8, 8)
        >>> gm(sample, torch.randn(1, 77, 64))[0].shape
        torch.Size([1, 128, 8, 8])
    """
    ratio = check_merge_ratio(config.ratio if ratio is None else ratio, config.sx, config.sy)
    if ratio == 0.0 or any(name.startswith("tome_") for name, _ in gm.named_children()):
        return gm
    grid = node_with_role(gm, BLOCK_INPUT)
    if grid is None:
        raise ValueError(f"graph has no block input (role {BLOCK_INPUT!r}): trace it with tracing.trace_block")
    graph = gm.graph
    for index in layer_indices(gm):
        open_layer(gm, index, block_name or "block")
        prefix = f"tome_{{}}_{index}"
        seed = None if config.destination == "fixed" else config.seed + index
        gm.add_submodule(prefix.format("match"), TokenMatching(ratio, config.sx, config.sy, seed, f"{block_name}[{index}]"))
        gm.add_submodule(prefix.format("merge"), TokenMerge())
        gm.add_submodule(prefix.format("unmerge"), TokenUnmerge())

        norm1 = sublayer_call(gm, f"transformer_blocks.{index}.norm1")
        with graph.inserting_before(norm1):
            matching = graph.call_module(prefix.format("match"), (norm1.args[0], grid))
        matching.meta[ROLE] = TOME_MATCHING
        for sublayer in config.sublayers:
            node = sublayer_call(gm, f"transformer_blocks.{index}.{SUBLAYERS[sublayer]}")
            if node is None:
                continue
            with graph.inserting_before(node):
                merged = graph.call_module(prefix.format("merge"), (node.args[0], matching))
            node.replace_input_with(node.args[0], merged)
            with graph.inserting_after(node):
                unmerged = graph.call_module(prefix.format("unmerge"), (node, matching))
            node.replace_all_uses_with(unmerged, delete_user_cb=lambda user: user is not unmerged)
            merged.meta[ROLE] = TOME_MERGED
            unmerged.meta[ROLE] = TOME_UNMERGED
    return finalize(gm)
