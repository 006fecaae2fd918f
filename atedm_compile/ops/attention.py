"""The attention map the scorers read, in the forms it takes where it runs: per head on the CPU,
in chunks on an accelerator or under ``torch.compile``, in one Triton kernel, or batched for export
and FLOPs counting. ``attention_path`` forces a form (module-global, for tests and benchmarks), and
``MAP_CHUNK_BYTES`` sizes the chunks: set them here, in ``ops.attention``, where they are read.

Shapes: ``B`` batch, ``N`` image tokens, ``M`` key tokens (``N`` for self-attention, 77 for text),
``h`` heads, ``d`` head width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

HEAD_REDUCTIONS = ("mean", "rms")


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
    from .. import triton_map

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
