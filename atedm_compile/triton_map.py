"""The head-combined attention map in one Triton kernel: from Q, K and each row's log-sum-exp, the
map (1/h) sum_h exp(q_h k_h^T / sqrt(d) - lse_h) is accumulated tile by tile in registers and
written once, float32 [B, N, M]. No score tensor exists in memory at all (the chunked PyTorch form,
``ops.attention_with_map_chunked``, writes and reads each chunk's scores several times; at
SD-XL's level 2, N = M = 4096, that traffic is by our reckoning most of the map's cost, which no
GPU has timed yet). ``rms`` accumulates the squares and takes the root.

Where the attention kernel gives no log-sum-exp, a second kernel computes it (online softmax over
key tiles, as flash attention does). Both run on CUDA, and on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests check them against the PyTorch forms). The map is a
``torch.library`` custom op (``atedm_compile::head_map``), opaque to ``torch.compile``: a pruned
block compiles into one graph around it (``fullgraph=True``; checked on the CPU, with inductor too).

Triton is imported only when a map is asked for; ``available(device)`` says whether one can run.
"""

import functools
import importlib.util
import os
from typing import Optional

import torch

LOG2E = 1.4426950408889634


def available(device: "torch.device | str") -> bool:
    """Whether the Triton map can run on ``device``: Triton installed, and a CUDA device, or the CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def row_lse(Q, K, LSE, sqb, sqh, sqn, sqd, skb, skh, skm, skd, N, M: tl.constexpr, scale_log2e,
                D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                PRECISION: tl.constexpr):
        # One (image, head, row tile): log-sum-exp of the scaled scores over all keys, online.
        pn, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, D_PAD)
        q = tl.load(Q + b * sqb + h * sqh + rn[:, None] * sqn + rd[None, :] * sqd,
                    mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
        top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, M, BLOCK_M):
            rm = start + tl.arange(0, BLOCK_M)
            k = tl.load(K + b * skb + h * skh + rm[:, None] * skm + rd[None, :] * skd,
                        mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # log2 units
            s = tl.where(rm[None, :] < M, s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, axis=1))
            total = total * tl.exp2(top - new_top) + tl.sum(tl.exp2(s - new_top[:, None]), axis=1)
            top = new_top
        tl.store(LSE + (b * tl.num_programs(1) + h) * N + rn, (top + tl.log2(total)) / 1.4426950408889634,
                 mask=rn < N)

    @triton.jit
    def head_map(Q, K, LSE, OUT, sqb, sqh, sqn, sqd, skb, skh, skm, skd, slb, slh, sln, N, M, H: tl.constexpr,
                 scale_log2e, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, SQUARE: tl.constexpr, PRECISION: tl.constexpr):
        # One (image, row tile, key tile): every head's probabilities, summed in registers.
        pn, pm, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, D_PAD)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for h in range(H):
            q = tl.load(Q + b * sqb + h * sqh + rn[:, None] * sqn + rd[None, :] * sqd,
                        mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
            k = tl.load(K + b * skb + h * skh + rm[:, None] * skm + rd[None, :] * skd,
                        mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
            lse = tl.load(LSE + b * slb + h * slh + rn * sln, mask=rn < N, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            p = tl.exp2(s * scale_log2e - lse[:, None] * 1.4426950408889634)
            if SQUARE:
                p = p * p
            acc += p
        acc = acc / H
        if SQUARE:
            acc = tl.sqrt(acc)
        out = OUT + b * N * M + rn[:, None] * M + rm[None, :]
        tl.store(out, acc, mask=(rn[:, None] < N) & (rm[None, :] < M))

    return triton, row_lse, head_map


def _launch(q: torch.Tensor, k: torch.Tensor, lse: Optional[torch.Tensor], square: bool) -> torch.Tensor:
    triton, row_lse, head_map = _kernels()
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the interpreter has no bf16 products
        q, k = q.float(), k.float()
    batch, heads, tokens, head_dim = q.shape
    keys = k.shape[2]
    d_pad = max(16, triton.next_power_of_2(head_dim))
    # float32 products in full precision (the tests compare to 1e-5); fp16 / bf16 on tensor cores.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scale_log2e = head_dim**-0.5 * LOG2E
    block_n = block_m = 64
    if lse is None:
        lse = torch.empty(batch, heads, tokens, device=q.device, dtype=torch.float32)
        row_lse[(triton.cdiv(tokens, block_n), heads, batch)](
            q, k, lse, *q.stride(), *k.stride(), tokens, keys, scale_log2e,
            D=head_dim, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_M=block_m, PRECISION=precision)
    out = torch.empty(batch, tokens, keys, device=q.device, dtype=torch.float32)
    head_map[(triton.cdiv(tokens, block_n), triton.cdiv(keys, block_m), batch)](
        q, k, lse, out, *q.stride(), *k.stride(), *lse.stride(), tokens, keys, heads, scale_log2e,
        D=head_dim, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_M=block_m, SQUARE=square, PRECISION=precision)
    return out


@torch.library.custom_op("atedm_compile::head_map", mutates_args=())
def head_map(q: torch.Tensor, k: torch.Tensor, lse: Optional[torch.Tensor], square: bool) -> torch.Tensor:
    """q: [B, h, N, d], k: [B, h, M, d] (unscaled), lse: [B, h, N] float32 log-sum-exp of each row
    of q k^T / sqrt(d) (None: computed here) -> map [B, N, M] float32, the mean over heads of the
    softmax probabilities (``square``: the root of the mean of their squares)."""
    if not available(q.device):
        raise RuntimeError(f"the Triton attention map needs Triton and a CUDA device (or TRITON_INTERPRET=1 on "
                           f"the CPU); got device {q.device}")
    return _launch(q, k, lse, square)


@head_map.register_fake
def _(q, k, lse, square):
    return q.new_empty(q.shape[0], q.shape[2], k.shape[2], dtype=torch.float32)
