"""Which tokens a pruned block keeps: the static k, top-k by score (within patches of the token
grid, if asked), and the gather / scatter between all N tokens and the k kept ones.

Shapes: ``B`` batch, ``N`` image tokens, ``C`` channels, ``k`` kept tokens. TopK with a constant K,
Gather / GatherElements, ScatterElements without reduction: export-legal.
"""

from __future__ import annotations

import math

import torch


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """k = round(keep_ratio * N), halves rounded up, at least 1 (the paper's static k)."""
    return max(1, min(num_tokens, int(math.floor(keep_ratio * num_tokens + 0.5))))


def patch_side(k: int, height: int, width: int, cell: int) -> int:
    """The side of the patches that a choice of k tokens on a ``height`` x ``width`` grid uses:
    ``cell``, grown one token at a time until there are at most k patches.

    With more patches than kept tokens only the winners of the best-scoring patches would be kept,
    and whole regions of the grid would keep nothing (G-WPR's winners crowd together): at SD-XL's
    2.9 budget (keep 0.063) a 16 x 16 grid keeps 16 tokens, and 3 x 3 patches would number 36.
    Grown to 4 x 4 there are 16, one kept per patch. Where there are at most k patches, ``cell``."""
    side = cell
    while side < max(height, width) and -(-height // side) * -(-width // side) > k:
        side += 1
    return side


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per image, in descending order. scores: [B, N] -> [B, k]."""
    return torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices


def cell_winners(scores: torch.Tensor, height: int, width: int, cell: int) -> torch.Tensor:
    """The index of the best-scoring token of every ``cell`` x ``cell`` patch of the token grid
    (patches from the top left, the last row and column of them cut short where ``cell`` does not
    divide the grid; on a tie the first token of the patch in row-major order).

    scores: [B, N] with N = height * width -> [B, P], P = ceil(height / cell) * ceil(width / cell),
    patches in row-major order. Static shapes: Pad, Reshape, Transpose, ArgMax in ONNX.
    """
    batch = scores.shape[0]
    rows, cols = -(-height // cell), -(-width // cell)
    grid = scores.reshape(batch, height, width)
    if (rows * cell, cols * cell) != (height, width):
        grid = torch.nn.functional.pad(grid, (0, cols * cell - width, 0, rows * cell - height), value=float("-inf"))
    patches = grid.reshape(batch, rows, cell, cols, cell).transpose(2, 3).reshape(batch, rows, cols, cell * cell)
    local = patches.argmax(dim=-1)  # [B, rows, cols]
    row = torch.arange(rows, device=scores.device).view(1, rows, 1) * cell + local // cell
    col = torch.arange(cols, device=scores.device).view(1, 1, cols) * cell + local % cell
    return (row * width + col).reshape(batch, rows * cols)


def select_top_k_per_cell(scores: torch.Tensor, k: int, height: int, width: int, cell: int) -> torch.Tensor:
    """Indices of k tokens per image: the best-scoring token of every ``cell`` x ``cell`` patch
    (``cell_winners``) first, by score (only the k best of them where k is smaller than the number
    of patches), then the highest scores of the rest. ``cell`` 1 is ``select_top_k``.

    scores: [B, N] -> [B, k]. Every pruned token then has a kept token within its own patch, which
    a pruning by score alone does not promise (G-WPR keeps the tokens everyone attends to, and
    they may crowd together). Two TopKs, no more than k each, and a ScatterElements without
    reduction: export-legal."""
    if cell == 1:
        return select_top_k(scores, k)
    return _winners_then_by_score(scores, k, cell_winners(scores, height, width, cell))


def _winners_then_by_score(scores: torch.Tensor, k: int, winners: torch.Tensor) -> torch.Tensor:
    first = min(k, winners.shape[1])
    order = select_top_k(torch.gather(scores, 1, winners), first)
    index = torch.gather(winners, 1, order)
    if first == k:
        return index
    others = scores.scatter(1, winners, torch.full(winners.shape, float("-inf"), dtype=scores.dtype,
                                                   device=scores.device))
    return torch.cat([index, select_top_k(others, k - first)], dim=1)


def select_distinct_per_cell(scores: torch.Tensor, hidden: torch.Tensor, k: int, height: int, width: int,
                             cell: int) -> torch.Tensor:
    """Indices of k tokens per image: the best-scoring token of every ``cell`` x ``cell`` patch
    (``cell_winners``), then the k - P tokens least similar to all of them: those whose highest
    cosine (of ``hidden``) to a patch winner is lowest. Where k is at most the number of patches P,
    ``select_top_k_per_cell``. scores: [B, N], hidden: [B, N, C] -> [B, k].

    The winners spread the kept tokens over the grid; the rest go where a recovery from the
    winners would be worst (ToMe's redundancy criterion, turned around: ToMe merges the tokens
    most similar to its destinations). One [B, N, P] cosine product, a ScatterElements without
    reduction and a TopK of k - P: export-legal."""
    winners = cell_winners(scores, height, width, cell)
    places = winners.shape[1]
    if k <= places:
        return _winners_then_by_score(scores, k, winners)
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    redundancy = (unit @ gather_tokens(unit, winners).transpose(1, 2)).amax(dim=-1)  # [B, N]
    # The winners are kept already: out of the running for the rest.
    redundancy = redundancy.scatter(1, winners, torch.full(winners.shape, float("inf"), dtype=redundancy.dtype,
                                                           device=redundancy.device))
    rest = torch.topk(redundancy, k - places, dim=-1, largest=False, sorted=True).indices
    return torch.cat([winners, rest], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, N, C], index: [B, k] -> [B, k, C]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Write kept: [B, k, C] into base: [B, N, C] at index: [B, k] (no reduction)."""
    return base.scatter(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), kept)
