"""Pass: before ``proj_out``, give a pruned block its full token grid back."""

from __future__ import annotations

import torch.fx as fx

from ..config import DEFAULT_PRUNING, PruningConfig
from ..modules import KeptMerge, NearestKept, TokenRecovery
from ..ops import RECOVERIES
from ..roles import (BEFORE_FF, BLOCK_INPUT, KEPT_INDICES, KEPT_MATCH, KEPT_MERGED, LAYER_OUT, PRUNED, RECOVERED, ROLE,
                     SELF_ATTENTION_KEYS)
from ..tracing import finalize, last_layer_node, node_with_role
from .expose_attention_map import exposed_map

MATCH = "atedm_match"
MERGE = "atedm_merge"
RECOVERY = "atedm_recovery"


def _states_between(gm: fx.GraphModule, last: fx.Node) -> list[fx.Node]:
    """The kept tokens' values after each layer that runs on them, but the last: with the pruning
    point before the first layer's FF, that layer's output first; then every later layer's."""
    states = []
    opened = node_with_role(gm, LAYER_OUT)
    if node_with_role(gm, BEFORE_FF) is not None and opened is not None and opened is not last:
        pruned = node_with_role(gm, PRUNED)
        if pruned is not None and pruned.args[0] is node_with_role(gm, BEFORE_FF):
            states.append(opened)
    states += [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("transformer_blocks.")
               and n.target.count(".") == 1 and n is not last]
    return states


def insert_token_recovery(gm: fx.GraphModule, config: PruningConfig = DEFAULT_PRUNING) -> fx.GraphModule:
    """After the block's last layer, every pruned token takes a value by ``config.recovery``
    (``config`` defaults to ``DEFAULT_PRUNING``, as ``apply``'s does; the paper's ``similarity``:
    the final value of the kept token most similar to it; ``delta``: its own value at
    the pruning point plus the update of the kept token most similar to it, which reads the kept
    tokens' values at the pruning point, the node with role ``PRUNED``); kept tokens keep their own.

    The recovery module is called with (last layer's output, kept indices, every token at the
    pruning point, block input, match, [kept tokens at the pruning point, [states...]]); the
    optional inputs are wired where ``ops.RECOVERIES[config.recovery].reads`` names them. A
    recovery that reads the match gets every token matched to its most similar kept token(s) right
    after the kept tokens are chosen (a ``NearestKept`` node, role ``KEPT_MATCH``), so that only the
    match ([B, N, m] positions), not the [B, N, N] map or the keys, is held while the later layers
    run. Returns the graph unchanged when the block is not pruned or already recovered.
    """
    index = node_with_role(gm, KEPT_INDICES)
    if index is None or node_with_role(gm, RECOVERED) is not None:
        return gm
    reads = RECOVERIES[config.recovery].reads
    before = node_with_role(gm, PRUNED).args[0]  # the gather's source: every token at the pruning point
    grid = node_with_role(gm, BLOCK_INPUT)
    match = None
    if "match" in reads:
        if config.similarity == "attention":
            similarity = exposed_map(gm, "self", config.head_reduction)
        else:
            similarity = node_with_role(gm, SELF_ATTENTION_KEYS)
            if similarity is None:
                raise ValueError("key-cosine recovery needs the first layer's keys: run expose_attention_map first")
        gm.add_submodule(MATCH, NearestKept(config))
        with gm.graph.inserting_after(index):
            match = gm.graph.call_module(MATCH, (index, similarity))
        match.meta[ROLE] = KEPT_MATCH
    kept_before = node_with_role(gm, PRUNED)
    if RECOVERIES[config.recovery].merges:
        # The later layers run on the kept tokens' cluster means; their update is final minus these.
        gm.add_submodule(MERGE, KeptMerge())
        with gm.graph.inserting_after(kept_before):
            merged = gm.graph.call_module(MERGE, (kept_before, before, match))
        merged.meta[ROLE] = KEPT_MERGED
        kept_before.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)
        kept_before = merged
    last = last_layer_node(gm)
    args = (last, index, before, grid, match)
    if "kept_before" in reads or "states" in reads:  # positional: the states come after it
        # The kept tokens' values at the pruning point: their update is final minus these.
        args += (kept_before,)
    if "states" in reads:
        args += tuple(_states_between(gm, last))
    gm.add_submodule(RECOVERY, TokenRecovery(config))
    with gm.graph.inserting_after(last):
        recovered = gm.graph.call_module(RECOVERY, args)
    recovered.meta[ROLE] = RECOVERED
    last.replace_all_uses_with(recovered, delete_user_cb=lambda user: user is not recovered)
    return finalize(gm)
