"""How important each token of a block is: G-WPR on the self-attention map (the paper's), its
cross-attention variants (supp. C.2) and random scores (the ablation), and ``SCORERS``, the table
the config, the pruning pass and ``TokenScorer`` all read.

Shapes: ``B`` batch, ``N`` image tokens, ``M`` key tokens, ``C`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import roles


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def gwpr_self_attention(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """G-WPR on a self-attention map. attn: [B, N, N] (row i = where query i looks) -> [B, N].

    s_0 = 1/N, then s <- A^T s: a token is important when important tokens attend to it. The
    scores are renormalised every round so that an ``rms`` map (rows not stochastic) stays bounded.
    """
    batch, tokens, _ = attn.shape
    scores = attn.new_full((batch, 1, tokens), 1.0 / tokens)
    for _ in range(iterations):
        scores = _normalise(torch.bmm(scores, attn))
    return scores.squeeze(1)


CROSS_ATTENTION_SCORERS = ("ca-entropy", "ca-hardclip", "ca-softclip", "ca-power")


def gwpr_cross_attention(
    attn: torch.Tensor,
    iterations: int,
    method: str,
    eta: float = 0.2,
    alpha: float = 5.0,
) -> torch.Tensor:
    """G-WPR on a cross-attention map (supp. C.2). attn: [B, N, M] -> [B, N].

    Each round: key importance s_K = A^T s_Q, then query importance s_Q(x_i) = f(A, s_K):

    - ``ca-entropy`` (form ours): <A_i, s_K> * exp(-H(A_i)); the dot product rewards attending to
      important keys, exp(-H) = 1 / perplexity of the row penalises a uniform row.
    - ``ca-hardclip``: sum_j [A_ij >= eta] s_K(x_j).
    - ``ca-softclip``: sum_j sigmoid(A_ij - eta) s_K(x_j).
    - ``ca-power``: sum_j (beta s_K(x_j))^(alpha A_ij), beta = M / 2.
    """
    batch, tokens, keys = attn.shape
    query_scores = attn.new_full((batch, tokens), 1.0 / tokens)
    for _ in range(iterations):
        key_scores = _normalise(torch.bmm(query_scores.unsqueeze(1), attn).squeeze(1))  # [B, M]
        if method == "ca-entropy":
            entropy = -(attn * attn.clamp_min(1e-12).log()).sum(dim=-1)
            query_scores = torch.bmm(attn, key_scores.unsqueeze(-1)).squeeze(-1) * torch.exp(-entropy)
        elif method == "ca-hardclip":
            query_scores = torch.bmm((attn >= eta).to(attn.dtype), key_scores.unsqueeze(-1)).squeeze(-1)
        elif method == "ca-softclip":
            query_scores = torch.bmm(torch.sigmoid(attn - eta), key_scores.unsqueeze(-1)).squeeze(-1)
        elif method == "ca-power":
            base = (keys / 2.0) * key_scores.unsqueeze(1)  # [B, 1, M]
            query_scores = torch.pow(base.clamp_min(1e-12), alpha * attn).sum(dim=-1)
        else:
            raise ValueError(f"cross-attention scorer {method!r} is not one of {CROSS_ATTENTION_SCORERS}")
        query_scores = _normalise(query_scores)
    return query_scores


def random_scores(like: torch.Tensor, seed: int) -> torch.Tensor:
    """Scores for the random-pruning ablation: the same draw for a given seed and shape.

    like: [B, N, C] -> [B, N].
    """
    shape = like.shape[:2]
    if like.device.type == "meta":
        return torch.rand(shape, device=like.device)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=like.device)


HIDDEN = "hidden"  # a scorer's source: the hidden states [B, N, C] at the pruning point
SOURCES = (roles.SELF_ATTENTION_MAP, roles.CROSS_ATTENTION_MAP, HIDDEN)


@dataclass(frozen=True)
class Scorer:
    """One way to score tokens.

    score: ``score(source, settings) -> [B, N]``. ``source`` is the graph value ``reads`` names;
        ``settings`` has the ``PruningConfig`` fields ``scorer``, ``iterations``, ``eta``,
        ``alpha`` and ``seed`` (``TokenScorer`` passes itself).
    reads: ``roles.SELF_ATTENTION_MAP`` (the first layer's head-combined map [B, N, N]),
        ``roles.CROSS_ATTENTION_MAP`` ([B, N, M], M text tokens) or ``HIDDEN`` (the hidden states
        [B, N, C] at the pruning point). The pruning passes expose the map a scorer reads.
    """

    score: Callable[[torch.Tensor, Any], torch.Tensor]
    reads: str

    def __post_init__(self):
        if self.reads not in SOURCES:
            raise ValueError(f"a scorer reads one of {list(SOURCES)}, not {self.reads!r}")


def _gwpr(attn: torch.Tensor, settings) -> torch.Tensor:
    return gwpr_self_attention(attn, settings.iterations)


def _gwpr_cross(attn: torch.Tensor, settings) -> torch.Tensor:
    return gwpr_cross_attention(attn, settings.iterations, settings.scorer, settings.eta, settings.alpha)


def _random(hidden: torch.Tensor, settings) -> torch.Tensor:
    return random_scores(hidden, settings.seed)


# Name -> scorer: ``PruningConfig(scorer=...)`` and ``--scorer`` accept these names, in this order.
SCORERS: dict[str, Scorer] = {
    "gwpr": Scorer(_gwpr, roles.SELF_ATTENTION_MAP),
    **{name: Scorer(_gwpr_cross, roles.CROSS_ATTENTION_MAP) for name in CROSS_ATTENTION_SCORERS},
    "random": Scorer(_random, HIDDEN),
}
