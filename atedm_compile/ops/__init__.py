"""Pure tensor functions of AT-EDM, one module per job, each beside the inserted module that calls it:

- ``attention``: the first layer's attention with its head-combined map (``attention_with_map``
  and its per-head, chunked, Triton and batched forms), for ``expose_attention_map``;
- ``scoring``: G-WPR and the other scorers, and the ``SCORERS`` table, for ``TokenScorer``;
- ``selection``: the static k, top-k (per patch), gather and scatter, for ``TokenSelector``;
- ``recovery``: the match to the nearest kept tokens and the recoveries, and the ``RECOVERIES``
  table, for ``NearestKept`` and ``TokenRecovery``.

No module surgery here; the passes insert calls to these functions. Every function is written with
operators that export to ONNX and that TensorRT accepts: TopK with a constant K, Gather /
GatherElements, ScatterElements without reduction, no data-dependent shapes.

The settings of the attention forms (``attention.MAP_CHUNK_BYTES``, and the functions tests patch)
are read in ``ops.attention``: set or patch them there; a copy here would not be seen.
"""

from .attention import (
    ATTENTION_PATHS,
    HEAD_REDUCTIONS,
    attend,
    attention_path,
    attention_probs,
    attention_with_map,
    attention_with_map_chunked,
    attention_with_map_triton,
    fused_attention_with_lse,
    map_chunks,
    reduce_heads,
    split_heads,
)
from .recovery import (
    RECOVERIES,
    Recovery,
    RecoveryInputs,
    copy_nearest,
    key_cosine_to_kept,
    nearest_kept,
    merge_into_kept,
    recover_delta_nearest,
    recover_merged_delta,
    recover_direct_copy,
    recover_interpolation,
    recover_layer_delta,
    recover_zeros,
    similarity_to_kept,
)
from .scoring import CROSS_ATTENTION_SCORERS, SCORERS, Scorer, gwpr_cross_attention, gwpr_self_attention, random_scores
from .selection import (
    cell_winners,
    gather_tokens,
    keep_count,
    patch_side,
    scatter_tokens,
    select_distinct_per_cell,
    select_top_k,
    select_top_k_per_cell,
)

__all__ = [
    "ATTENTION_PATHS", "CROSS_ATTENTION_SCORERS", "HEAD_REDUCTIONS", "RECOVERIES", "SCORERS", "Recovery",
    "RecoveryInputs", "Scorer", "attend", "attention_path", "attention_probs", "attention_with_map",
    "attention_with_map_chunked", "attention_with_map_triton", "cell_winners", "copy_nearest",
    "fused_attention_with_lse", "gather_tokens", "gwpr_cross_attention", "gwpr_self_attention", "keep_count",
    "key_cosine_to_kept", "map_chunks", "nearest_kept", "random_scores", "merge_into_kept", "recover_delta_nearest", "recover_merged_delta",
    "recover_direct_copy", "recover_interpolation", "recover_layer_delta", "recover_zeros", "reduce_heads",
    "patch_side", "scatter_tokens", "select_distinct_per_cell", "select_top_k", "select_top_k_per_cell", "similarity_to_kept",
    "split_heads",
]
