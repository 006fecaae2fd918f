"""The modules the passes insert: token scoring, selection, the match of every token to its nearest
kept tokens, and recovery (AT-EDM); token matching, merging and unmerging (the ToMe baseline);
the downsampled keys and values of ToDo.

They hold their configuration as attributes (readable in ``gm.code`` and ``print(gm)``) and call
the pure functions of ``ops`` (scorers and recoveries through its ``SCORERS`` / ``RECOVERIES``
tables, looked up by name at each call). Being modules also lets FLOPs counting attribute the
scoring and recovery work to them, apart from the U-Net's own work.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import ops, tome
from .config import PruningConfig
from .ops import RECOVERIES, SCORERS, RecoveryInputs


class TokenScorer(torch.nn.Module):
    """Scores the tokens of one block: G-WPR on the first layer's self-attention map (or a
    cross-attention scorer on its cross-attention map), or random scores.

    forward(source) -> scores [B, N]: source is what ``ops.SCORERS[scorer].reads`` names: the
    head-combined map [B, N, M] (``gwpr``, ``ca-*``) or, for ``random``, the hidden states [B, N, C]
    (only their shape and device are read).
    The pruning pass puts it right after the map, so that the map (B x N x N float32) is freed
    before the layer's FF runs, unless a recovery still reads it.
    """

    def __init__(self, config: PruningConfig):
        super().__init__()
        self.scorer = config.scorer
        self.iterations = config.iterations
        self.eta = config.eta
        self.alpha = config.alpha
        self.seed = config.seed

    def extra_repr(self) -> str:
        return f"scorer={self.scorer!r}, iterations={self.iterations}"

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return SCORERS[self.scorer].score(source, self)


class TokenSelector(torch.nn.Module):
    """Returns the indices of the k kept tokens of one block per image, from their scores.

    forward(scores [B, N], hidden [B, N, C] at the pruning point (only with ``fill="distinct"``;
            else None), grid [B, C', H, W] (the block input, for H and W; only with ``cell`` > 1))
            -> [B, k]
    """

    def __init__(self, keep_ratio: float, config: PruningConfig, block_name: str = ""):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.scorer = config.scorer
        self.cell = config.cell
        self.fill = config.fill
        self.block_name = block_name
        # When a dict, each call records its kept indices here under block_name (capture_kept_tokens).
        self.capture: dict | None = None

    @property
    def reads_hidden(self) -> bool:
        """Whether the choice reads the hidden states at the pruning point (the distinct fill), not
        the scores alone."""
        return self.cell > 1 and self.fill == "distinct"

    def extra_repr(self) -> str:
        text = f"block={self.block_name!r}, keep_ratio={self.keep_ratio}, scorer={self.scorer!r}"
        return text + (f", cell={self.cell}, fill={self.fill!r}" if self.cell > 1 else "")

    def forward(self, scores: torch.Tensor, hidden: torch.Tensor | None = None,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        k = ops.keep_count(scores.shape[1], self.keep_ratio)
        if self.cell > 1:
            if grid is None:
                raise ValueError(f"{self.block_name}: cell={self.cell} needs the block input for its token grid")
            height, width = _grid_of(grid, scores, self.block_name)
            cell = ops.patch_side(k, height, width, self.cell)
            if self.reads_hidden:
                if hidden is None:
                    raise ValueError(f"{self.block_name}: fill='distinct' needs the hidden states at the pruning point")
                index = ops.select_distinct_per_cell(scores, hidden, k, height, width, cell)
            else:
                index = ops.select_top_k_per_cell(scores, k, height, width, cell)
        else:
            index = ops.select_top_k(scores, k)
        if self.capture is not None:
            self.capture[self.block_name] = index.detach().clone()
        return index


class NearestKept(torch.nn.Module):
    """Finds every token's most similar kept token(s) in a pruned block, for the recovery (AT-EDM's
    match; not ToMe's ``TokenMatching``, which pairs tokens to merge).

    forward(index [B, k], similarity [B, N, N] head-combined map or keys [B, N, C''])
            -> (positions [B, N, m] in the kept list, weights [B, N, m] or None for m = 1)

    The recovery pass puts it right after the kept tokens are chosen: what the recovery reads
    afterwards is [B, N, m], not the map or the keys (``ops.nearest_kept``).
    """

    def __init__(self, config: PruningConfig):
        super().__init__()
        self.similarity = config.similarity
        self.neighbours = config.neighbours if RECOVERIES[config.recovery].neighbours else 1

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, neighbours={self.neighbours}"

    def forward(self, index: torch.Tensor, similarity: torch.Tensor):
        if self.similarity == "attention":
            to_kept = ops.similarity_to_kept(index, similarity)
        else:
            to_kept = ops.key_cosine_to_kept(index, similarity)
        return ops.nearest_kept(to_kept, self.neighbours)


class KeptMerge(torch.nn.Module):
    """Puts every kept token's cluster mean in its place for the later layers (the ``merge-delta``
    recovery): the mean of the tokens whose most similar kept token it is.

    forward(kept [B, k, C], before [B, N, C] every token at the pruning point, match (positions,
            weights) from ``NearestKept``) -> [B, k, C]
    """

    def forward(self, kept: torch.Tensor, before: torch.Tensor, match) -> torch.Tensor:
        return ops.merge_into_kept(before, match[0], kept.shape[1])


class TokenRecovery(torch.nn.Module):
    """Brings a pruned block back to its full token count before ``proj_out``.

    forward(kept [B, k, C], index [B, k], before [B, N, C] (the value at the pruning point),
            grid [B, C', H, W] (the block input, for its H and W),
            match (positions, weights) from ``NearestKept`` (``similarity`` and ``delta``; else None),
            kept_before [B, k, C] (the kept tokens at the pruning point; ``delta`` and ``layer-delta``),
            *states [B, k, C] (the kept tokens after each later layer but the last; ``layer-delta``))
            -> [B, N, C]

    What each recovery reads is in ``ops.RECOVERIES``; it is given them as one ``ops.RecoveryInputs``.
    """

    def __init__(self, config: PruningConfig):
        super().__init__()
        self.method = config.recovery
        recovery = RECOVERIES[config.recovery]
        self.similarity = config.similarity if "match" in recovery.reads else None
        self.neighbours = config.neighbours if recovery.neighbours else None

    def extra_repr(self) -> str:
        text = f"method={self.method!r}"
        if self.similarity is not None:
            text += f", similarity={self.similarity!r}"
        if self.neighbours is not None:
            text += f", neighbours={self.neighbours}"
        return text

    def forward(self, kept, index, before, grid, match=None, kept_before=None, *states):
        inputs = RecoveryInputs(kept, index, before, grid, match, kept_before, states)
        return RECOVERIES[self.method].recover(inputs)


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


# -- ToDo: the keys and values of a self-attention from a downsampled token grid --


class TokenDownsample(torch.nn.Module):
    """forward(x [B, N, C], grid [B, C', H, W] (the block input, for H and W; N = H * W))
    -> [B, h * w, C] with h = floor(H / factor), w = floor(W / factor) (at least 1)"""

    _MODES = {"nearest": "nearest", "avg": "area"}

    def __init__(self, factor: float, method: str, where: str = ""):
        super().__init__()
        self.factor = factor
        self.method = method
        self.where = where

    def extra_repr(self) -> str:
        return f"where={self.where!r}, factor={self.factor}, method={self.method!r}"

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        height, width = _grid_of(grid, x, self.where)
        # The 1e-6 keeps 1 / sqrt(1 / 9), a hair above 3, from costing a row: 24 / 3 is 8, not 7.
        size = tuple(max(1, int(side / self.factor + 1e-6)) for side in (height, width))
        image = x.transpose(1, 2).unflatten(2, (height, width))
        return F.interpolate(image, size=size, mode=self._MODES[self.method]).flatten(2).transpose(1, 2)
