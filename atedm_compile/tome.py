"""Pure tensor functions of ToMe for SD (Bolya & Hoffman 2023), the baseline of supp. B.1:
bipartite soft matching with one destination per ``sy x sx`` cell, mean merge, unmerge by copy.

The math follows ``tomesd.merge.bipartite_soft_matching_random2d`` (tomesd 0.1.3) step for step;
only the operators differ. tomesd merges with ``scatter_reduce(mean)``, which does not export to
ONNX and which TensorRT does not run correctly; here every step is a Gather, MatMul, TopK with a
constant K, ArgMax / ReduceMax, Equal or ScatterElements without reduction, with static shapes:

- merge: the destination sums are ``assignment @ merged_sources`` with a one-hot
  ``assignment: [B, N_dst, r]``, divided by ``1 + (sources per destination)``: the mean over the
  destination and its sources that ``scatter_reduce(mean, include_self=True)`` computes;
- unmerge: one gather from the merged sequence by each token's position in it.

The split into destinations and sources depends on the grid only: under ``torch.onnx.export`` it
folds to constants.

Shapes: ``B`` batch, ``N = H * W`` tokens of the grid, ``C`` channels, ``N_dst`` destinations (one
per cell), ``N_src = N - N_dst`` sources, ``r`` merged sources.
"""

from __future__ import annotations

import random
import warnings
from typing import NamedTuple

import torch


class Matching(NamedTuple):
    """The result of one bipartite soft matching, shared by every merge and unmerge of a layer.

    sources_kept: [B, N_src - r] tokens of the sources that stay apart.
    sources_merged: [B, r] tokens of the sources merged into a destination.
    destinations: [N_dst] tokens of the destinations (the same for every image).
    assignment: [B, N_dst, r] one-hot (x's dtype): merged source i goes into destination j.
    position: [B, N] where each token sits in the merged sequence ``[sources_kept | destinations]``.
    """

    sources_kept: torch.Tensor
    sources_merged: torch.Tensor
    destinations: torch.Tensor
    assignment: torch.Tensor
    position: torch.Tensor


def merge_count(num_tokens: int, ratio: float) -> int:
    """r = int(N * ratio), as tomesd (``bipartite_soft_matching`` caps it at N_src)."""
    return int(num_tokens * ratio)


def destination_offsets(rows: int, cols: int, sx: int, sy: int, seed: int | None) -> torch.Tensor:
    """Which token of each ``sy x sx`` cell is its destination: ``dy * sx + dx``. -> [rows, cols].

    ``seed=None``: 0, the top-left token of every cell (tomesd's ``use_rand=False``). Otherwise
    drawn uniformly from ``seed`` (our choice: one draw per seed and grid, the same at every call,
    where tomesd redraws at every call from torch's global generator). The draw is made in Python
    so that a traced or exported graph holds it as a constant.
    """
    if seed is None:
        return torch.zeros(rows, cols, dtype=torch.int64)
    draw = random.Random(seed)
    offsets = [[draw.randrange(sx * sy) for _ in range(cols)] for _ in range(rows)]
    with warnings.catch_warnings():
        # Under torch.onnx.export the tracer warns that this tensor becomes a constant: it should.
        warnings.filterwarnings("ignore", message="torch.tensor results are registered as constants")
        return torch.tensor(offsets, dtype=torch.int64)


def split_destinations(height: int, width: int, sx: int, sy: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination and source tokens of an ``height x width`` grid, each in token order (tomesd
    orders them by an unstable argsort; the order changes nothing once unmerged).

    offsets: [height // sy, width // sx] (``destination_offsets``) -> ([N_dst], [N_src]). Tokens of
    a partial cell at the right or bottom edge are all sources, as in tomesd.
    """
    rows, cols = offsets.shape
    row = torch.arange(rows).unsqueeze(1) * sy + torch.div(offsets, sx, rounding_mode="floor")
    col = torch.arange(cols).unsqueeze(0) * sx + offsets % sx
    destinations = (row * width + col).flatten()
    is_destination = torch.zeros(height * width, dtype=torch.int64).scatter(0, destinations, 1)
    order = torch.argsort(is_destination, stable=True)  # sources first, each group in token order
    return destinations, order[: height * width - destinations.shape[0]]


# Under torch.compile the split is a constant of the graph, made once while compiling.
@torch.compiler.assume_constant_result
def grid_split(height: int, width: int, sx: int, sy: int, seed: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``split_destinations`` of the ``destination_offsets`` drawn from ``seed``, on ``device``."""
    offsets = destination_offsets(height // sy, width // sx, sx, sy, seed)
    return tuple(t.to(device) for t in split_destinations(height, width, sx, sy, offsets))


def bipartite_soft_matching(
    metric: torch.Tensor,
    height: int,
    width: int,
    r: int,
    sx: int = 2,
    sy: int = 2,
    seed: int | None = None,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Matching:
    """Match each source to its most similar destination (cosine) and pick the r best-matched
    sources to merge.

    metric: [B, N, C] with N = height * width (tomesd: the hidden states entering the layer);
    height, width: Python ints, so that the split and every count are constants of the graph;
    r: ``merge_count``; seed: ``destination_offsets``; split: ``grid_split``'s result on
    ``metric``'s device when the caller keeps it (no host-to-device copy per call).
    """
    tokens = height * width
    num_destinations = (height // sy) * (width // sx)
    num_sources = tokens - num_destinations
    r = min(r, num_sources)
    num_kept = num_sources - r
    destinations, sources = split or grid_split(height, width, sx, sy, seed, metric.device)

    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, sources] @ metric[:, destinations].transpose(-1, -2)  # [B, N_src, N_dst]
    best, target = scores.max(dim=-1)
    order = torch.topk(best, num_sources, dim=-1).indices  # most similar first
    merged_order, kept_order = order[:, :r], order[:, r:]
    sources_merged, sources_kept = sources[merged_order], sources[kept_order]
    merged_target = target.gather(1, merged_order)  # [B, r], a position in the destination list

    slots = torch.arange(num_destinations, device=metric.device).view(1, -1, 1)
    assignment = (merged_target.unsqueeze(1) == slots).to(metric.dtype)

    batch = metric.shape[0]
    apart = torch.cat([sources_kept, destinations.expand(batch, -1)], dim=1)  # [B, N - r]
    slot_of_apart = torch.arange(tokens - r, device=metric.device).expand(batch, -1)
    position = torch.zeros(batch, tokens, dtype=torch.int64, device=metric.device)
    position = position.scatter(1, apart, slot_of_apart).scatter(1, sources_merged, num_kept + merged_target)
    return Matching(sources_kept, sources_merged, destinations, assignment, position)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_tokens(x: torch.Tensor, matching: Matching) -> torch.Tensor:
    """x: [B, N, C] -> [B, N - r, C]: the kept sources, then each destination averaged with the
    sources merged into it."""
    sums = x[:, matching.destinations] + matching.assignment @ _take(x, matching.sources_merged)
    counts = 1.0 + matching.assignment.sum(dim=-1, keepdim=True)
    return torch.cat([_take(x, matching.sources_kept), sums / counts], dim=1)


def unmerge_tokens(x: torch.Tensor, matching: Matching) -> torch.Tensor:
    """x: [B, N - r, C] -> [B, N, C]: every token takes the value at its place in the merged
    sequence (a merged source: its destination's)."""
    return _take(x, matching.position)
