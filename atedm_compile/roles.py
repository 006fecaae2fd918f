"""The roles of graph nodes: how the passes find each other's nodes, named once.

A node's role is ``node.meta[ROLE]``; at most one node of a block graph has each role
(``tracing.node_with_role``). ``tracing`` marks the traced block's anchors, each pass marks what it
adds, and a later pass looks them up here by name, never by ``node.name``. ``docs/architecture.md``
has the same table with who reads each.
"""

ROLE = "atedm_role"  # the ``node.meta`` key

# Set by tracing.trace_block / open_layer (layer 0 only).
BLOCK_INPUT = "block_input"  # hidden_states [B, C, H, W]: the token grid's H and W
SELF_ATTENTION = "self_attention"  # the first layer's attn1 call (until expose_attention_map replaces it)
CROSS_ATTENTION = "cross_attention"  # the first layer's attn2 call
BEFORE_FF = "before_ff"  # the first layer's hidden states [B, N, C] before its feed-forward
LAYER_OUT = "layer_out"  # the first layer's output [B, N, C]

# Set by expose_attention_map.
SELF_ATTENTION_MAP = "self_attention_map"  # [B, N, N], heads combined; meta["head_reduction"]
CROSS_ATTENTION_MAP = "cross_attention_map"  # [B, N, 77]
SELF_ATTENTION_KEYS = "self_attention_keys"  # the first layer's attn1 keys [B, N, h*d]
CROSS_ATTENTION_KEYS = "cross_attention_keys"  # its attn2 keys [B, 77, h*d]

# Set by insert_token_pruning.
TOKEN_SCORES = "token_scores"  # [B, N]
KEPT_INDICES = "kept_indices"  # [B, k]
PRUNED = "pruned"  # the kept tokens at the pruning point [B, k, C]; args[0]: every token there

# Set by insert_token_recovery.
KEPT_MATCH = "kept_match"  # every token's most similar kept token(s): (positions, weights)
KEPT_MERGED = "kept_merged"  # the kept tokens' cluster means [B, k, C], in their place (merge-delta)
RECOVERED = "recovered"  # the block's tokens after its last layer, all N again [B, N, C]

# Set by insert_token_merging (ToMe).
TOME_MATCHING = "tome_matching"
TOME_MERGED = "tome_merged"
TOME_UNMERGED = "tome_unmerged"


def attention_map(which: str) -> str:
    """The role of the exposed ``which`` (``self`` / ``cross``) attention map."""
    return {"self": SELF_ATTENTION_MAP, "cross": CROSS_ATTENTION_MAP}[which]


def attention_keys(which: str) -> str:
    """The role of the exposed ``which`` attention's keys."""
    return {"self": SELF_ATTENTION_KEYS, "cross": CROSS_ATTENTION_KEYS}[which]
