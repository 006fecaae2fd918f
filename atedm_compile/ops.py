"""Pure tensor functions of AT-EDM: attention maps, G-WPR scores, top-k selection, gather and
recovery. No module surgery here; the passes insert calls to these functions.

Shapes: ``B`` batch, ``N`` image tokens, ``M`` key tokens (``N`` for self-attention, 77 for text),
``h`` heads, ``d`` head width, ``C`` channels, ``k`` kept tokens.

Every function is written with operators that export to ONNX and that TensorRT accepts: TopK with
a constant K, Gather / GatherElements, ScatterElements without reduction, no data-dependent shapes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

HEAD_REDUCTIONS = ("mean", "rms")


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """k = round(keep_ratio * N), halves rounded up, at least 1 (the paper's static k)."""
    return max(1, min(num_tokens, int(math.floor(keep_ratio * num_tokens + 0.5))))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x: [B, N, h*d] -> [B, h, N, d]."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def attention_probs(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention map softmax(Q K^T / sqrt(d)) per head.

    query: [B, N, h*d], key: [B, M, h*d] (the layer's own projections) -> [B, h, N, M].
    The softmax runs in float32 so that an fp16 graph does not overflow; the map is returned in
    the input dtype.
    """
    q, k = split_heads(query, heads), split_heads(key, heads)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)


def attend(probs: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """probs: [B, h, N, M], value: [B, M, h*d] -> [B, N, h*d]."""
    out = torch.matmul(probs, split_heads(value, heads))
    batch, _, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


ATTENTION_PATHS = ("auto", "per-head", "chunked", "triton", "batched")
_attention_path = "auto"

# The chunked form's largest chunk: its scores, in the compute dtype and then in float32, take at
# most this much together. SD-XL's level 2 at 1024 px (B=2, N=4096, fp16): one head in 7 tiles of
# 586 query rows (beside the 128 MiB float32 map); level 3 (1024 tokens) 2 heads at once.
MAP_CHUNK_BYTES = 32 * 2**20


@contextlib.contextmanager
def attention_path(path: str):
    """Force the form ``attention_with_map`` takes inside the block (tests, benchmarks):
    ``per-head`` (the CPU loop), ``chunked`` (the accelerator form), ``triton`` (the chunked
    form's map in one Triton kernel, ``attention_with_map_triton``), ``batched`` (export) or
    ``auto``. A compiled graph guards on it: changing it recompiles.

    Example:
        >>> q = k = v = torch.randn(1, 16, 8)
        >>> with attention_path("chunked"):
        ...     out, combined = attention_with_map(q, k, v, heads=2)
        >>> combined.shape
        torch.Size([1, 16, 16])
    """
    global _attention_path
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path {path!r} is not one of {ATTENTION_PATHS}")
    before, _attention_path = _attention_path, path
    try:
        yield
    finally:
        _attention_path = before


def _auto_path(query: torch.Tensor) -> str:
    # Export and FLOPs counting (meta) see the plain batched form: one Q K^T, one map, operators
    # every backend knows. Compiled or on an accelerator: the fused kernel plus the chunked map.
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or query.device.type == "meta":
        return "batched"
    if torch.compiler.is_compiling() or query.device.type != "cpu":
        return "chunked"
    return "per-head"


def attention_with_map(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention softmax(Q K^T / sqrt(d)) V together with its map, heads combined.

    query: [B, N, h*d], key and value: [B, M, h*d] -> (out [B, N, h*d], map [B, N, M]).

    One Q K^T serves the layer's output and the scoring. The form depends on where it runs
    (``attention_path`` forces one):

    - ``per-head`` (CPU, eager): one (image, head) pair at a time, so that each N x M map stays in
      cache (about 3x faster than the batched form at N = 1024 here).
    - ``chunked`` (an accelerator, or under ``torch.compile``): ``attention_with_map_chunked``,
      the output from the fused kernel and the map a chunk (heads, or one head's row tiles) at a
      time, never h maps at once.
    - ``batched`` (traced for export, on the meta device for FLOPs counting, or where autograd
      records: the others write in place): the plain [B, h, N, M] softmax, which export backends
      fuse and which counts the map once.

    The map is float32 on the first two (probabilities near 1/N keep their order), in the input
    dtype on the third.
    """
    if reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head reduction {reduction!r} is not one of {HEAD_REDUCTIONS}")
    path = _auto_path(query) if _attention_path == "auto" else _attention_path
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        path = "batched"  # the other two write in place: only the plain form is differentiable
    if path == "batched":
        probs = attention_probs(query, key, heads)
        return attend(probs, value, heads), reduce_heads(probs, reduction)
    if path == "chunked":
        return attention_with_map_chunked(query, key, value, heads, reduction)
    if path == "triton":
        return attention_with_map_triton(query, key, value, heads, reduction)
    q = split_heads(query * (query.shape[-1] // heads) ** -0.5, heads)
    k, v = split_heads(key, heads), split_heads(value, heads)
    batch, _, tokens, head_dim = q.shape
    out = query.new_empty(batch, heads, tokens, head_dim)
    combined = query.new_zeros(batch, tokens, key.shape[1], dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            probs = torch.mm(q[b, h], k[b, h].t()).softmax(dim=-1, dtype=torch.float32)
            torch.mm(probs.to(value.dtype), v[b, h], out=out[b, h])
            combined[b].add_(probs if reduction == "mean" else probs.square())
    combined = combined / heads if reduction == "mean" else (combined / heads).sqrt()
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim), combined


def fused_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: [B, h, N, d], k and v: [B, h, M, d] -> (out [B, h, N, d], log-sum-exp of each row of
    the scaled scores [B, h, N] float32, or None where no fused kernel returns it)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and torch.cuda.get_device_properties(q.device).major >= 8):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    return F.scaled_dot_product_attention(q, k, v), None


def map_chunks(batch: int, tokens: int, keys: int, heads: int, dtype: torch.dtype) -> tuple[int, int]:
    """(heads, query rows) per chunk of the chunked map: its scores in ``dtype`` and in float32
    take at most ``MAP_CHUNK_BYTES`` (at least one row of one head), spread evenly: whole heads,
    as many as fit, where one head fits; else one head in row tiles."""
    per_row = batch * keys * (dtype.itemsize + 4)
    rows = max(1, MAP_CHUNK_BYTES // per_row)
    if rows >= tokens:
        largest = min(heads, rows // tokens)
        return -(-heads // -(-heads // largest)), tokens
    return 1, -(-tokens // -(-tokens // rows))


def attention_with_map_chunked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    heads: int,
    reduction: str = "mean",
    chunk: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_map`` without h maps in memory: the layer's output from the fused
    attention kernel, the map accumulated a chunk (``chunk`` = (heads, query rows); default:
    ``map_chunks``) at a time into one float32 [B, N, M] buffer.

    query: [B, N, h*d], key and value: [B, M, h*d] -> (out [B, N, h*d], map [B, N, M] float32).

    Each chunk's scores Q K^T are computed in the compute dtype, then scaled and normalised in
    float32 (one kernel reads them); the softmax statistics are float32: the row log-sum-exp the fused kernel returns (CUDA flash
    attention on fp16 / bf16, the CPU kernel) or, where none does, one computed per chunk. Extra
    memory: the buffer, B x N x M x 4 bytes, and one chunk's scores (``MAP_CHUNK_BYTES``).
    Everything is static in shape: no host synchronisation, one graph under ``torch.compile``.
    """
    q, k, out, lse = _fused_heads(query, key, value, heads, reduction)
    batch, _, tokens, head_dim = q.shape
    keys = k.shape[2]
    head_chunk, row_tile = chunk or map_chunks(batch, tokens, keys, heads, query.dtype)
    scale = head_dim**-0.5
    combined = query.new_zeros(batch, tokens, keys, dtype=torch.float32)
    for start in range(0, heads, head_chunk):
        part = slice(start, start + head_chunk)
        k_t = k[:, part].transpose(-1, -2)
        for first in range(0, tokens, row_tile):
            rows = slice(first, min(first + row_tile, tokens))
            scores = torch.matmul(q[:, part, rows], k_t)  # [B, c, r, M], compute dtype
            if lse is None:
                row_lse = torch.logsumexp(scores.float() * scale, dim=-1)  # not in place: scores is read again
            else:
                row_lse = lse[:, part, rows]
            # exp(scale * s - lse) in float32, the scores read once: one kernel, then exp in place.
            probs = torch.add(row_lse.unsqueeze(-1).neg(), scores, alpha=scale).exp_()
            if reduction == "rms":
                probs.square_()
            target = combined[:, rows]
            for head in range(probs.shape[1]):  # in place: no [B, r, M] temporary beside the buffer
                target += probs[:, head]
            del scores, probs  # eager: free this chunk before the next one's scores exist
    combined = combined.div_(heads) if reduction == "mean" else combined.div_(heads).sqrt_()
    return out, combined


def _fused_heads(query, key, value, heads: int, reduction: str):
    """The chunked and Triton forms' common part: q and k per head [B, h, *, d], the layer's output
    from the fused kernel [B, N, h*d] and its row log-sum-exp [B, h, N] (None where it gives none)."""
    if reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head reduction {reduction!r} is not one of {HEAD_REDUCTIONS}")
    q, k, v = split_heads(query, heads), split_heads(key, heads), split_heads(value, heads)
    out, lse = fused_attention_with_lse(q, k, v)
    batch, _, tokens, head_dim = q.shape
    return q, k, out.transpose(1, 2).reshape(batch, tokens, heads * head_dim), lse


def attention_with_map_triton(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_map_chunked`` with the map from one Triton kernel (``triton_map.head_map``):
    the layer's output from the fused attention kernel, the map accumulated over heads in
    registers from Q, K and the kernel's row log-sum-exp (or one a second Triton kernel computes)
    and written once. No scores in memory; extra memory: the B x N x M float32 map alone.

    query: [B, N, h*d], key and value: [B, M, h*d] -> (out [B, N, h*d], map [B, N, M] float32).
    Needs Triton and a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).
    """
    from . import triton_map

    q, k, out, lse = _fused_heads(query, key, value, heads, reduction)
    tokens = q.shape[2]
    return out, triton_map.head_map(q, k, None if lse is None else lse[..., :tokens], reduction == "rms")


def reduce_heads(probs: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Combine the heads of an attention map: [B, h, N, M] -> [B, N, M].

    ``mean`` keeps rows stochastic (AT-EDM); ``rms`` is Zero-TPrune's alternative, which lets a
    head with a peaked map weigh more.
    """
    if how == "mean":
        return probs.mean(dim=1)
    if how == "rms":
        return probs.square().mean(dim=1).sqrt()
    raise ValueError(f"head reduction {how!r} is not one of {HEAD_REDUCTIONS}")


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


def copy_from(kept: torch.Tensor, index: torch.Tensor, to_kept: torch.Tensor) -> torch.Tensor:
    """Similarity-based copy (the paper's recovery): every token takes the final value of the kept
    token it is most similar to; kept tokens keep their own.

    kept: [B, k, C] (final values), index: [B, k], to_kept: [B, N, k] similarity of every token to
    each kept one (``similarity_to_kept``, ``key_cosine_to_kept``) -> [B, N, C].
    """
    return copy_nearest(kept, index, nearest_kept(to_kept)[0])


def copy_nearest(kept: torch.Tensor, index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``copy_from`` with the match made: positions [B, N, 1] (``nearest_kept``) -> [B, N, C]."""
    return scatter_tokens(gather_tokens(kept, positions[..., 0]), index, kept)


def copy_from_most_similar(kept: torch.Tensor, index: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``copy_from`` by a similarity map. similarity: [B, N, N] (row i: token i's similarity to
    every token) -> [B, N, C]."""
    return copy_from(kept, index, similarity_to_kept(index, similarity))


def copy_from_most_similar_key(kept: torch.Tensor, index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``copy_from`` by key cosine. keys: [B, N, C'] -> [B, N, C]."""
    return copy_from(kept, index, key_cosine_to_kept(index, keys))


def recover_delta(
    kept: torch.Tensor,
    kept_before: torch.Tensor,
    index: torch.Tensor,
    before: torch.Tensor,
    to_kept: torch.Tensor,
    neighbours: int = 1,
) -> torch.Tensor:
    """Delta recovery: a pruned token keeps its own value from the pruning point and adds the
    update that the later layers gave the kept token(s) most similar to it; kept tokens keep
    their final values.

        x_i = x_i(prune) + sum_j w_ij (x_j(final) - x_j(prune))

    With ``neighbours=1``, w_ij = 1 for the most similar kept token j. With m > 1 neighbours the
    update is a weighted mean over the m most similar kept tokens (all of them where k < m), weighted by their similarity
    renormalised over those m (for a head-averaged attention map: the map restricted to them);
    similarities below zero (key cosines) weigh nothing.

    kept: [B, k, C] final values of the kept tokens, kept_before: [B, k, C] their values at the
    pruning point, index: [B, k], before: [B, N, C] every token at the pruning point, to_kept:
    [B, N, k] similarity of every token to each kept one (``similarity_to_kept``,
    ``key_cosine_to_kept``) -> [B, N, C].
    """
    return recover_delta_nearest(kept, kept_before, index, before, *nearest_kept(to_kept, neighbours))


def recover_delta_nearest(
    kept: torch.Tensor,
    kept_before: torch.Tensor,
    index: torch.Tensor,
    before: torch.Tensor,
    positions: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``recover_delta`` with the match made (``nearest_kept``): positions [B, N, m], weights
    [B, N, m] (None for m = 1) -> [B, N, C]."""
    update = kept - kept_before  # [B, k, C]
    if weights is None:
        moved = gather_tokens(update, positions[..., 0])
    else:
        batch, tokens, neighbours = positions.shape
        updates = gather_tokens(update, positions.flatten(1)).view(batch, tokens, neighbours, -1)
        moved = torch.matmul(weights.unsqueeze(-2), updates).squeeze(-2)  # [B, N, C]
    return scatter_tokens(before + moved, index, kept)


def recover_layer_delta(states: list[torch.Tensor], index: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Layer-by-layer delta recovery: a pruned token starts from its own value at the pruning point
    and, at every later layer, adds the update that layer gave the kept token then most similar to
    it (cosine of the values entering the layer); kept tokens keep their final values.

        x_i(l + 1) = x_i(l) + x_j(l + 1) - x_j(l),  j = argmax_j cos(x_i(l), x_j(l))

    ``recover_delta`` matches once, at the pruning point, for all layers; here the match follows
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
