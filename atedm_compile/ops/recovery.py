"""How a pruned block gets its N tokens back after its last layer: the paper's copy from the most
similar kept token, the delta recoveries (ours), the supp. A.6 baselines, and ``RECOVERIES``, the
table the config, the recovery pass and ``TokenRecovery`` all read.

Shapes: ``B`` batch, ``N`` image tokens, ``C`` channels, ``k`` kept tokens, ``m`` neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .selection import gather_tokens, scatter_tokens


def similarity_to_kept(index: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """The columns of a similarity map that belong to kept tokens.

    index: [B, k], similarity: [B, N, N] (row i: token i's similarity to every token) -> [B, N, k].
    """
    return torch.gather(similarity, 2, index.unsqueeze(1).expand(-1, similarity.shape[1], -1))


def key_cosine_to_kept(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token's key to every kept token's key: only the [B, N, k] block
    of the full matrix that recovery reads. keys: [B, N, C'], index: [B, k] -> [B, N, k]."""
    unit = F.normalize(keys, dim=-1)
    return torch.bmm(unit, gather_tokens(unit, index).transpose(1, 2))


def nearest_kept(to_kept: torch.Tensor, neighbours: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The m most similar kept tokens of every token: their positions in the kept list [B, N, m]
    and, with m > 1, their weights [B, N, m] (the similarities renormalised over those m; below
    zero, as key cosines can be, they weigh next to nothing, and all-negative rows average evenly).
    m is at most k. to_kept: [B, N, k] (``similarity_to_kept``, ``key_cosine_to_kept``).

    What a recovery needs of the similarity, and far smaller: made as soon as the kept tokens are
    known, it lets the [B, N, N] map (or the keys) go before the later layers run."""
    if neighbours == 1:
        return to_kept.argmax(dim=-1, keepdim=True), None
    nearest = torch.topk(to_kept, min(neighbours, to_kept.shape[-1]), dim=-1, largest=True, sorted=True)
    weights = nearest.values.clamp_min(torch.finfo(to_kept.dtype).tiny)
    return nearest.indices, weights / weights.sum(dim=-1, keepdim=True)


def copy_nearest(kept: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Similarity-based copy (the paper's recovery): every token takes the final value of the kept
    token it is most similar to; kept tokens keep their own.

    kept: [B, k, C] (final values), index: [B, k], positions: [B, N, 1] (``nearest_kept``) ->
    [B, N, C].
    """
    return scatter_tokens(gather_tokens(kept, positions[..., 0]), index, kept)


def recover_delta_nearest(
    kept: torch.Tensor,
    kept_before: torch.Tensor,
    index: torch.Tensor,
    before: torch.Tensor,
    positions: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Delta recovery: a pruned token keeps its own value from the pruning point and adds the
    update that the later layers gave the kept token(s) most similar to it; kept tokens keep
    their final values.

        x_i = x_i(prune) + sum_j w_ij (x_j(final) - x_j(prune))

    With one neighbour (``weights`` None), w_ij = 1 for the most similar kept token j. With m > 1
    neighbours the update is a weighted mean over the m most similar kept tokens (all of them where
    k < m), weighted by their similarity renormalised over those m (for a head-averaged attention
    map: the map restricted to them); similarities below zero (key cosines) weigh nothing.

    kept: [B, k, C] final values of the kept tokens, kept_before: [B, k, C] their values at the
    pruning point, index: [B, k], before: [B, N, C] every token at the pruning point, positions
    and weights: [B, N, m] (``nearest_kept``) -> [B, N, C].
    """
    update = kept - kept_before  # [B, k, C]
    if weights is None:
        moved = gather_tokens(update, positions[..., 0])
    else:
        batch, tokens, neighbours = positions.shape
        updates = gather_tokens(update, positions.flatten(1)).view(batch, tokens, neighbours, -1)
        moved = torch.matmul(weights.unsqueeze(-2), updates).squeeze(-2)  # [B, N, C]
    return scatter_tokens(before + moved, index, kept)


def merge_into_kept(before: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """Every kept token's cluster mean: the mean, at the pruning point, of the tokens whose most
    similar kept token it is (itself among them, a kept token being its own most similar).

    before: [B, N, C], positions: [B, N, m] (``nearest_kept``; the first, most similar, is used),
    count: k -> [B, k, C]. A kept token that no token chose (itself matched elsewhere: a tie)
    averages nothing and is zero. A one-hot [B, N, k] product, not a scatter with add reduction,
    which TensorRT rejects (``export.lint``): B N k C MACs, counted with the method's own work."""
    slots = torch.arange(count, device=before.device)
    members = (positions[..., :1] == slots).to(before.dtype)  # [B, N, k]
    total = torch.bmm(members.transpose(1, 2), before)
    return total / members.sum(dim=1).clamp_min(1).unsqueeze(-1)


def recover_merged_delta(kept: torch.Tensor, merged: torch.Tensor, before: torch.Tensor, positions: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Merged delta recovery: the later layers ran on the cluster means (``merge_into_kept``) in the
    kept tokens' place; every token, kept ones too, keeps its own value from the pruning point and
    adds the update its most similar kept token's cluster got (ToMe's unmerge, in residual form):

        x_i = x_i(prune) + sum_j w_ij (x_j(final) - mean_j(prune))

    kept: [B, k, C] final values, merged: [B, k, C] the means they started from, before: [B, N, C],
    positions and weights: [B, N, m] -> [B, N, C]."""
    update = kept - merged
    if weights is None:
        return before + gather_tokens(update, positions[..., 0])
    batch, tokens, neighbours = positions.shape
    updates = gather_tokens(update, positions.flatten(1)).view(batch, tokens, neighbours, -1)
    return before + torch.matmul(weights.unsqueeze(-2), updates).squeeze(-2)


def recover_layer_delta(states: list[torch.Tensor], index: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Layer-by-layer delta recovery: a pruned token starts from its own value at the pruning point
    and, at every later layer, adds the update that layer gave the kept token then most similar to
    it (cosine of the values entering the layer); kept tokens keep their final values.

        x_i(l + 1) = x_i(l) + x_j(l + 1) - x_j(l),  j = argmax_j cos(x_i(l), x_j(l))

    ``recover_delta_nearest`` matches once, at the pruning point, for all layers; here the match follows
    the token as it changes (as ToMe matches again at every layer).

    states: the kept tokens' values [B, k, C] at the pruning point, then after each later layer
    (the last: their final values); index: [B, k]; before: [B, N, C] every token at the pruning
    point -> [B, N, C]. One [B, N, k] cosine product per layer, ArgMax and Gather: export-legal.
    """
    x = before
    for current, following in zip(states[:-1], states[1:]):
        similarity = torch.bmm(F.normalize(x, dim=-1), F.normalize(current, dim=-1).transpose(1, 2))
        x = x + gather_tokens(following - current, similarity.argmax(dim=-1))
    return scatter_tokens(x, index, states[-1])


def recover_zeros(kept: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Baseline (supp. A.6 I): pruned tokens are zero."""
    base = kept.new_zeros(kept.shape[0], num_tokens, kept.shape[-1])
    return scatter_tokens(base, index, kept)


def recover_direct_copy(kept: torch.Tensor, index: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Baseline (supp. A.6 III): pruned tokens keep their value from the pruning point.
    before: [B, N, C]."""
    return scatter_tokens(before, index, kept)


def recover_interpolation(kept: torch.Tensor, index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Baseline (supp. A.6 II): zeros at pruned places, downsample x2, bicubic upsample; only the
    pruned places take the interpolated values."""
    batch, _, channels = kept.shape
    padded = recover_zeros(kept, index, height * width)
    grid = padded.transpose(1, 2).reshape(batch, channels, height, width)
    small = F.interpolate(grid, size=(max(1, height // 2), max(1, width // 2)), mode="bilinear", align_corners=False)
    smooth = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)
    return scatter_tokens(smooth.flatten(2).transpose(1, 2), index, kept)


class RecoveryInputs(NamedTuple):
    """What a recovery is given; the graph nodes each comes from are in docs/architecture.md.

    kept: [B, k, C] the kept tokens' final values; index: [B, k]; before: [B, N, C] every token
    at the pruning point; grid: [B, C', H, W] the block input (for H and W). Only where the
    recovery ``reads`` them (else None / empty): match, (positions [B, N, m], weights [B, N, m] or
    None for m = 1) from ``nearest_kept``; kept_before, [B, k, C] the kept tokens at the pruning
    point; states, the kept tokens [B, k, C] after each later layer but the last.
    """

    kept: torch.Tensor
    index: torch.Tensor
    before: torch.Tensor
    grid: torch.Tensor
    match: tuple | None = None
    kept_before: torch.Tensor | None = None
    states: tuple = ()


OPTIONAL_INPUTS = ("match", "kept_before", "states")


@dataclass(frozen=True)
class Recovery:
    """One way to recover the pruned tokens.

    recover: ``recover(inputs: RecoveryInputs) -> [B, N, C]``.
    reads: which of ``OPTIONAL_INPUTS`` it needs (the recovery pass wires only those; ``match``
        also makes it read ``PruningConfig.similarity``).
    neighbours: whether ``PruningConfig.neighbours`` applies (its match holds the m most similar
        kept tokens, not one).
    merges: the later layers run on the kept tokens' cluster means (``merge_into_kept``), not on
        the kept tokens themselves; ``kept_before`` is then those means (needs the match).
    """

    recover: Callable[[RecoveryInputs], torch.Tensor]
    reads: tuple[str, ...] = ()
    neighbours: bool = False
    merges: bool = False

    def __post_init__(self):
        unknown = [name for name in self.reads if name not in OPTIONAL_INPUTS]
        if unknown:
            raise ValueError(f"a recovery reads some of {list(OPTIONAL_INPUTS)}, not {unknown}")
        if self.merges and not {"match", "kept_before"} <= set(self.reads):
            raise ValueError("a merging recovery reads the match and the merged kept tokens: reads must name "
                             "'match' and 'kept_before'")
        if self.neighbours and "match" not in self.reads:
            raise ValueError("a recovery with neighbours reads the match: add 'match' to reads")


def _copy(inputs: RecoveryInputs) -> torch.Tensor:
    return copy_nearest(inputs.kept, inputs.index, inputs.match[0])


def _delta(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_delta_nearest(inputs.kept, inputs.kept_before, inputs.index, inputs.before, *inputs.match)


def _merged_delta(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_merged_delta(inputs.kept, inputs.kept_before, inputs.before, *inputs.match)


def _layer_delta(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_layer_delta([inputs.kept_before, *inputs.states, inputs.kept], inputs.index, inputs.before)


def _zeros(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_zeros(inputs.kept, inputs.index, inputs.before.shape[1])


def _interpolation(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_interpolation(inputs.kept, inputs.index, inputs.grid.shape[-2], inputs.grid.shape[-1])


def _direct_copy(inputs: RecoveryInputs) -> torch.Tensor:
    return recover_direct_copy(inputs.kept, inputs.index, inputs.before)


# Name -> recovery: ``PruningConfig(recovery=...)`` and ``--recovery`` accept these names, in this order.
RECOVERIES: dict[str, Recovery] = {
    "similarity": Recovery(_copy, ("match",)),
    "delta": Recovery(_delta, ("match", "kept_before"), neighbours=True),
    "merge-delta": Recovery(_merged_delta, ("match", "kept_before"), neighbours=True, merges=True),
    "layer-delta": Recovery(_layer_delta, ("kept_before", "states")),
    "zeros": Recovery(_zeros),
    "interpolation": Recovery(_interpolation),
    "direct-copy": Recovery(_direct_copy),
}
