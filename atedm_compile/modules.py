"""The modules the passes insert: token selection and token recovery (AT-EDM), and token
matching, merging and unmerging (the ToMe baseline).

They hold their configuration as attributes (readable in ``gm.code`` and ``print(gm)``) and call
the pure functions of ``ops``. Being modules also lets FLOPs counting attribute the scoring and
recovery work to them, apart from the U-Net's own work.
"""

from __future__ import annotations

import warnings

import torch

from . import ops, tome
from .config import SIMILARITY_RECOVERIES, PruningConfig


class TokenSelector(torch.nn.Module):
    """Scores the tokens of one block and returns the indices of the k kept ones per image.

    forward(hidden [B, N, C], attention_map [B, N, M] head-combined or None,
            grid [B, C', H, W] (the block input, for H and W; only with ``cell`` > 1)) -> [B, k]
    """

    def __init__(self, keep_ratio: float, config: PruningConfig, block_name: str = ""):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.scorer = config.scorer
        self.iterations = config.iterations
        self.eta = config.eta
        self.alpha = config.alpha
        self.seed = config.seed
        self.cell = config.cell
        self.fill = config.fill
        self.block_name = block_name
        # When a dict, each call records its kept indices here under block_name (capture_kept_tokens).
        self.capture: dict | None = None

    def extra_repr(self) -> str:
        text = f"block={self.block_name!r}, keep_ratio={self.keep_ratio}, scorer={self.scorer!r}"
        return text + (f", cell={self.cell}, fill={self.fill!r}" if self.cell > 1 else "")

    def forward(self, hidden: torch.Tensor, attention_map: torch.Tensor | None = None,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        if self.scorer == "gwpr":
            scores = ops.gwpr_self_attention(attention_map, self.iterations)
        elif self.scorer == "random":
            scores = ops.random_scores(hidden, self.seed)
        else:
            scores = ops.gwpr_cross_attention(attention_map, self.iterations, self.scorer, self.eta, self.alpha)
        k = ops.keep_count(hidden.shape[1], self.keep_ratio)
        if self.cell > 1:
            if grid is None:
                raise ValueError(f"{self.block_name}: cell={self.cell} needs the block input for its token grid")
            height, width = _grid_of(grid, hidden, self.block_name)
            if self.fill == "distinct":
                index = ops.select_distinct_per_cell(scores, hidden, k, height, width, self.cell)
            else:
                index = ops.select_top_k_per_cell(scores, k, height, width, self.cell)
        else:
            index = ops.select_top_k(scores, k)
        if self.capture is not None:
            self.capture[self.block_name] = index.detach().clone()
        return index


class TokenRecovery(torch.nn.Module):
    """Brings a pruned block back to its full token count before ``proj_out``.

    forward(kept [B, k, C], index [B, k], before [B, N, C] (the value at the pruning point),
            grid [B, C', H, W] (the block input, for its H and W),
            similarity [B, N, N] head-combined map or keys [B, N, C''],
            kept_before [B, k, C] (the kept tokens at the pruning point; ``delta`` and ``layer-delta``),
            *states [B, k, C] (the kept tokens after each later layer but the last; ``layer-delta``))
            -> [B, N, C]
    """

    def __init__(self, config: PruningConfig):
        super().__init__()
        self.method = config.recovery
        self.similarity = config.similarity if config.recovery in SIMILARITY_RECOVERIES else None
        self.neighbours = config.neighbours if config.recovery == "delta" else None

    def extra_repr(self) -> str:
        text = f"method={self.method!r}"
        if self.similarity is not None:
            text += f", similarity={self.similarity!r}"
        if self.neighbours is not None:
            text += f", neighbours={self.neighbours}"
        return text

    def forward(self, kept, index, before, grid, similarity=None, kept_before=None, *states):
        if self.method == "layer-delta":
            return ops.recover_layer_delta([kept_before, *states, kept], index, before)
        if self.similarity is not None:
            if self.similarity == "attention":
                to_kept = ops.similarity_to_kept(index, similarity)
            else:
                to_kept = ops.key_cosine_to_kept(index, similarity)
            if self.method == "delta":
                return ops.recover_delta(kept, kept_before, index, before, to_kept, self.neighbours)
            return ops.copy_from(kept, index, to_kept)
        if self.method == "zeros":
            return ops.recover_zeros(kept, index, before.shape[1])
        if self.method == "direct-copy":
            return ops.recover_direct_copy(kept, index, before)
        return ops.recover_interpolation(kept, index, grid.shape[-2], grid.shape[-1])


# -- ToMe, the baseline: the modules insert_token_merging puts around each merged sub-layer --


def _static_sizes(*sizes) -> tuple[int, ...]:
    # Traced for export, sizes are tensors; the grid is static per engine (one per shape
    # profile), so they become constants on purpose and the tracer's warning says nothing new.
    if torch.compiler.is_compiling():  # plain ints there, and no warnings filter to trace
        return tuple(int(size) for size in sizes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return tuple(int(size) for size in sizes)


def _grid_of(grid: torch.Tensor, x: torch.Tensor, where: str) -> tuple[int, int]:
    """The token grid's (H, W), static, from the block input; ValueError unless x's N = H * W."""
    height, width, tokens = _static_sizes(grid.shape[-2], grid.shape[-1], x.shape[1])
    if height * width != tokens:
        raise ValueError(f"{where}: {tokens} tokens do not form the {height}x{width} grid")
    return height, width


class TokenMatching(torch.nn.Module):
    """Computes the matching of one layer from the hidden states entering it.

    forward(x [B, N, C], grid [B, C', H, W] (the block input, for H and W; N = H * W)) -> tome.Matching
    """

    def __init__(self, ratio: float, sx: int, sy: int, seed: int | None, where: str = ""):
        super().__init__()
        self.ratio = ratio
        self.sx, self.sy = sx, sy
        self.seed = seed
        self.where = where
        # (height, width, device) -> the grid's split, kept from eager calls: on a GPU, no
        # host-to-device copy (and wait) per layer and call; a compiled graph reads it as a constant.
        self._splits: dict = {}

    def extra_repr(self) -> str:
        return f"where={self.where!r}, ratio={self.ratio}, cell={self.sy}x{self.sx}, seed={self.seed}"

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> tome.Matching:
        height, width = _grid_of(grid, x, self.where)
        tokens = height * width
        r = tome.merge_count(tokens, self.ratio)
        key = (height, width, x.device)
        split = None if torch.jit.is_tracing() else self._splits.get(key)
        if split is None and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            split = self._splits[key] = tome.grid_split(height, width, self.sx, self.sy, self.seed, x.device)
        return tome.bipartite_soft_matching(x, height, width, r, self.sx, self.sy, self.seed, split)


class TokenMerge(torch.nn.Module):
    """forward(x [B, N, C], matching) -> [B, N - r, C]"""

    def forward(self, x: torch.Tensor, matching: tome.Matching) -> torch.Tensor:
        return tome.merge_tokens(x, matching)


class TokenUnmerge(torch.nn.Module):
    """forward(x [B, N - r, C], matching) -> [B, N, C]"""

    def forward(self, x: torch.Tensor, matching: tome.Matching) -> torch.Tensor:
        return tome.unmerge_tokens(x, matching)
