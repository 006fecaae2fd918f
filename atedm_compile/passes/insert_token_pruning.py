"""Pass: after the first layer of a block, keep the k most important tokens for the later layers."""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..config import PruningConfig, check_keep_ratio
from ..modules import TokenSelector
from ..tracing import ROLE, finalize, last_layer_node, node_with_role
from .expose_attention_map import exposed_map

SELECTOR = "atedm_selector"


def insert_token_pruning(
    gm: fx.GraphModule,
    keep_ratio: float,
    config: PruningConfig = PruningConfig(),
    block_name: str = "",
) -> fx.GraphModule:
    """Insert scoring, top-k and gather after the first layer (after its FF, or before it with
    ``config.prune_point="before-ff"``); every later layer then runs on the kept tokens only.

    Adds nodes with roles ``kept_indices`` ([B, k]) and ``pruned`` ([B, k, C]). Returns the graph
    unchanged when ``keep_ratio`` is 1.0, when the block has a single layer (nothing after the
    pruning point would gain) or when it is already pruned.
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    if keep_ratio == 1.0 or node_with_role(gm, "kept_indices") is not None:
        return gm
    if config.prune_point == "after-ff" and last_layer_node(gm).meta.get(ROLE) == "layer_out":
        return gm
    attention_map = None
    if config.scorer == "gwpr":
        attention_map = exposed_map(gm, "self", config.head_reduction)
    elif config.uses_cross_attention:
        attention_map = exposed_map(gm, "cross", config.head_reduction)

    point = node_with_role(gm, "layer_out" if config.prune_point == "after-ff" else "before_ff")
    gm.add_submodule(SELECTOR, TokenSelector(keep_ratio, config, block_name))
    graph = gm.graph
    with graph.inserting_after(point):
        # With cells, the selector reads the grid's H and W off the block input.
        grid = (node_with_role(gm, "block_input"),) if config.cell > 1 else ()
        index = graph.call_module(SELECTOR, (point, attention_map, *grid))
    with graph.inserting_after(index):
        kept = graph.call_function(ops.gather_tokens, (point, index))
    index.meta[ROLE] = "kept_indices"
    kept.meta[ROLE] = "pruned"
    point.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (index, kept))
    return finalize(gm)
