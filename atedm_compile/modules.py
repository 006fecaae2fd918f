"""The two modules the passes insert: token selection and token recovery.

They hold their configuration as attributes (readable in ``gm.code`` and ``print(gm)``) and call
the pure functions of ``ops``. Being modules also lets FLOPs counting attribute the scoring and
recovery work to them, apart from the U-Net's own work.
"""

from __future__ import annotations

import torch

from . import ops
from .config import SIMILARITY_RECOVERIES, PruningConfig


class TokenSelector(torch.nn.Module):
    """Scores the tokens of one block and returns the indices of the k kept ones per image.

    forward(hidden [B, N, C], attention_map [B, N, M] head-combined or None) -> [B, k]
    """

    def __init__(self, keep_ratio: float, config: PruningConfig, block_name: str = ""):
        super().__init__()
        self.keep_ratio = keep_ratio
        self.scorer = config.scorer
        self.iterations = config.iterations
        self.eta = config.eta
        self.alpha = config.alpha
        self.seed = config.seed
        self.block_name = block_name
        # When a dict, each call records its kept indices here under block_name (capture_kept_tokens).
        self.capture: dict | None = None

    def extra_repr(self) -> str:
        return f"block={self.block_name!r}, keep_ratio={self.keep_ratio}, scorer={self.scorer!r}"

    def forward(self, hidden: torch.Tensor, attention_map: torch.Tensor | None = None) -> torch.Tensor:
        if self.scorer == "gwpr":
            scores = ops.gwpr_self_attention(attention_map, self.iterations)
        elif self.scorer == "random":
            scores = ops.random_scores(hidden, self.seed)
        else:
            scores = ops.gwpr_cross_attention(attention_map, self.iterations, self.scorer, self.eta, self.alpha)
        index = ops.select_top_k(scores, ops.keep_count(hidden.shape[1], self.keep_ratio))
        if self.capture is not None:
            self.capture[self.block_name] = index.detach().clone()
        return index


class TokenRecovery(torch.nn.Module):
    """Brings a pruned block back to its full token count before ``proj_out``.

    forward(kept [B, k, C], index [B, k], before [B, N, C] (the value at the pruning point),
            grid [B, C', H, W] (the block input, for its H and W),
            similarity [B, N, N] head-combined map or keys [B, N, C''],
            kept_before [B, k, C] (the kept tokens at the pruning point; ``delta`` only)) -> [B, N, C]
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

    def forward(self, kept, index, before, grid, similarity=None, kept_before=None):
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
