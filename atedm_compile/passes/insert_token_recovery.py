"""Pass: before ``proj_out``, give a pruned block its full token grid back."""

from __future__ import annotations

import torch.fx as fx

from ..config import SIMILARITY_RECOVERIES, PruningConfig
from ..modules import TokenMatch, TokenRecovery
from ..tracing import ROLE, finalize, last_layer_node, node_with_role
from .expose_attention_map import exposed_map

MATCH = "atedm_match"
RECOVERY = "atedm_recovery"


def _states_between(gm: fx.GraphModule, last: fx.Node) -> list[fx.Node]:
    """The kept tokens' values after each layer that runs on them, but the last: with the pruning
    point before the first layer's FF, that layer's output first; then every later layer's."""
    states = []
    opened = node_with_role(gm, "layer_out")
    if node_with_role(gm, "before_ff") is not None and opened is not None and opened is not last:
        pruned = node_with_role(gm, "pruned")
        if pruned is not None and pruned.args[0] is node_with_role(gm, "before_ff"):
            states.append(opened)
    states += [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("transformer_blocks.")
               and n.target.count(".") == 1 and n is not last]
    return states


def insert_token_recovery(gm: fx.GraphModule, config: PruningConfig = PruningConfig()) -> fx.GraphModule:
    """After the block's last layer, every pruned token takes a value by ``config.recovery``
    (default: the final value of the kept token most similar to it; ``delta``: its own value at
    the pruning point plus the update of the kept token most similar to it, which reads the kept
    tokens' values at the pruning point, the node with role ``pruned``); kept tokens keep their own.

    The similarity recoveries match every token to its most similar kept token(s) right after
    the kept tokens are chosen (a ``TokenMatch`` node, role ``kept_match``), so that only the
    match ([B, N, m] positions), not the [B, N, N] map or the keys, is held while the later layers
    run. Returns the graph unchanged when the block is not pruned or already recovered.
    """
    index = node_with_role(gm, "kept_indices")
    if index is None or node_with_role(gm, "recovered") is not None:
        return gm
    before = node_with_role(gm, "pruned").args[0]  # the gather's source: every token at the pruning point
    grid = node_with_role(gm, "block_input")
    match = None
    if config.recovery in SIMILARITY_RECOVERIES:
        if config.similarity == "attention":
            similarity = exposed_map(gm, "self", config.head_reduction)
        else:
            similarity = node_with_role(gm, "self_attention_keys")
            if similarity is None:
                raise ValueError("key-cosine recovery needs the first layer's keys: run expose_attention_map first")
        gm.add_submodule(MATCH, TokenMatch(config))
        with gm.graph.inserting_after(index):
            match = gm.graph.call_module(MATCH, (index, similarity))
        match.meta[ROLE] = "kept_match"
    last = last_layer_node(gm)
    args = (last, index, before, grid, match)
    if config.recovery in ("delta", "layer-delta"):
        # The kept tokens' values at the pruning point: their update is final minus these.
        args += (node_with_role(gm, "pruned"),)
    if config.recovery == "layer-delta":
        args += tuple(_states_between(gm, last))
    gm.add_submodule(RECOVERY, TokenRecovery(config))
    with gm.graph.inserting_after(last):
        recovered = gm.graph.call_module(RECOVERY, args)
    recovered.meta[ROLE] = "recovered"
    last.replace_all_uses_with(recovered, delete_user_cb=lambda user: user is not recovered)
    return finalize(gm)
