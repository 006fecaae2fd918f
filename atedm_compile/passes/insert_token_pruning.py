"""Pass: after the first layer of a block, keep the k most important tokens for the later layers."""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..config import DEFAULT_PRUNING, PruningConfig, check_keep_ratio
from ..modules import TokenScorer, TokenSelector
from ..roles import (BEFORE_FF, BLOCK_INPUT, CROSS_ATTENTION_MAP, KEPT_INDICES, LAYER_OUT, PRUNED, ROLE,
                     SELF_ATTENTION_MAP, TOKEN_SCORES)
from ..tracing import finalize, last_layer_node, node_with_role
from .expose_attention_map import exposed_map

SCORER = "atedm_scorer"
SELECTOR = "atedm_selector"


def insert_token_pruning(
    gm: fx.GraphModule,
    keep_ratio: float,
    config: PruningConfig = DEFAULT_PRUNING,
    block_name: str = "",
) -> fx.GraphModule:
    """Insert scoring, top-k and gather after the first layer (after its FF, or before it with
    ``config.prune_point="before-ff"``); every later layer then runs on the kept tokens only.

    The scores are computed right after the attention map they read, and the kept tokens chosen
    right after them where the choice reads the scores alone (all but the distinct fill), so that
    the [B, N, N] map is freed before the rest of the first layer runs (on a GPU it is the largest
    thing a pruned step holds). The scorer reads what ``ops.SCORERS[config.scorer].reads`` names:
    an exposed attention map, or the hidden states at the pruning point. Adds nodes with roles
    ``TOKEN_SCORES`` ([B, N]), ``KEPT_INDICES`` ([B, k]) and ``PRUNED`` ([B, k, C]). Returns the
    graph unchanged when ``keep_ratio`` is 1.0, when the block has a single layer (nothing after the
    pruning point would gain) or when it is already pruned.
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    if keep_ratio == 1.0 or node_with_role(gm, KEPT_INDICES) is not None:
        return gm
    if config.prune_point == "after-ff" and last_layer_node(gm).meta.get(ROLE) == LAYER_OUT:
        return gm
    reads = ops.SCORERS[config.scorer].reads
    source = None
    if reads == SELF_ATTENTION_MAP:
        source = exposed_map(gm, "self", config.head_reduction)
    elif reads == CROSS_ATTENTION_MAP:
        source = exposed_map(gm, "cross", config.head_reduction)

    point = node_with_role(gm, LAYER_OUT if config.prune_point == "after-ff" else BEFORE_FF)
    selector = TokenSelector(keep_ratio, config, block_name)
    gm.add_submodule(SCORER, TokenScorer(config))
    gm.add_submodule(SELECTOR, selector)
    graph = gm.graph
    # A scorer of the hidden states (random) reads the point: then the scores, and all after them, follow it.
    with graph.inserting_after(source or point):
        scores = graph.call_module(SCORER, (source or point,))
    after_point = source is None or selector.reads_hidden  # whether the selection must wait for the point
    # With cells, the selector reads the grid's H and W off the block input.
    grid = (node_with_role(gm, BLOCK_INPUT),) if config.cell > 1 else ()
    hidden = point if selector.reads_hidden else None
    with graph.inserting_after(point if after_point and source is not None else scores):
        index = graph.call_module(SELECTOR, (scores, hidden, *grid))
    with graph.inserting_after(index if after_point else point):
        kept = graph.call_function(ops.gather_tokens, (point, index))
    scores.meta[ROLE] = TOKEN_SCORES
    index.meta[ROLE] = KEPT_INDICES
    kept.meta[ROLE] = PRUNED
    point.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (index, kept, scores))
    return finalize(gm)
