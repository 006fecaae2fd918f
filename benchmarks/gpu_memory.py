"""Peak activation memory of one U-Net call on a GPU, modelled on the CPU: the full model, the
prune-less and pruned phases (each attention-map path) and ToMe, side by side.

Issue 9 asks that a pruned step hold no more memory at its peak than the full model. Nothing
here needs a GPU or any memory: the U-Net is built on the meta device in the GPU's dtype (SD-XL
base, fp16, 1024 px, batch 2 by default) and every operator of one call is watched by
``memory.LiveBytes``, which adds up the bytes of the tensors alive at each moment. Attention runs
as CUDA's flash kernel would (diffusers' SDPA and the map paths' fused attention: the output and
the row log-sum-exp, no score matrix); the ``triton`` path as its kernel would (the float32 map
alone). What this leaves out: the caching allocator's rounding and fragmentation, cuBLAS and
flash workspaces, and what ``torch.compile`` changes (inductor fuses the chunked map's
float32 copy away, and plans buffers of its own). So it compares paths and settings; the GPU
run (``gpu_latency.py``) measures.

    python benchmarks/gpu_memory.py                                # sdxl-base, fp16, 1024 px, batch 2
    python benchmarks/gpu_memory.py --map-chunk-mib 16 32 64 192    # the chunked map's budget
    python benchmarks/gpu_memory.py --model tiny --height 64        # smoke test (in the tests)

Columns: the path of the first layer's attention map, the chunked map's budget (MiB of scores,
compute dtype and float32 together), peak MiB above the weights and inputs, its difference from
the full model's, and where it happens (operator, block).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import atedm_compile as ac  # noqa: E402
from atedm_compile.ops import attention  # noqa: E402
from atedm_compile.config import DEFAULT_PRUNING, PruningConfig, ToMeConfig  # noqa: E402
from atedm_compile.devices import DTYPES  # noqa: E402
from atedm_compile.flops import unet_inputs  # noqa: E402
from atedm_compile.memory import LiveBytes  # noqa: E402
from atedm_compile.models import build_unet, unet_config, vae_factor  # noqa: E402

CONFIGS = {"paper": PruningConfig(), "default": DEFAULT_PRUNING}
PATHS = ("chunked", "triton")


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("the model runs unmasked attention only")
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]


def _triton_map(query, key, value, heads, reduction="mean"):
    # The kernel's one allocation, beside the fused attention's output and statistics: the map.
    q, k, out, _ = attention._fused_heads(query, key, value, heads, reduction)
    return out, query.new_empty(q.shape[0], q.shape[2], k.shape[2], dtype=torch.float32)


@contextlib.contextmanager
def gpu_kernels():
    """Attention as on a CUDA GPU in fp16: the flash kernel's output and log-sum-exp, no scores."""
    saved = (torch.nn.functional.scaled_dot_product_attention, attention.fused_attention_with_lse,
             attention.attention_with_map_triton)
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **kw: _flash(*a, **kw)[0]
    attention.fused_attention_with_lse = lambda q, k, v: _flash(q, k, v)
    attention.attention_with_map_triton = _triton_map
    try:
        yield
    finally:
        (torch.nn.functional.scaled_dot_product_attention, attention.fused_attention_with_lse,
         attention.attention_with_map_triton) = saved


class _Blocks:
    """The innermost U-Net block (down_blocks.1.attentions.0, ...) each operator runs in."""

    def __init__(self, unet):
        self.stack: list[str] = []
        self.handles = []
        for name, module in unet.named_modules():
            if name and name.count(".") <= 3:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self.stack.append(name)))
                self.handles.append(module.register_forward_hook(self._leave))

    def _leave(self, module, args, output) -> None:  # a forward hook's answer would replace the output
        self.stack.pop()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def peak(unet, inputs, blocks: _Blocks) -> tuple[int, str]:
    """(peak bytes of one call above the weights and inputs, where: operator and block)."""
    live = LiveBytes(context=lambda: blocks.stack[-1] if blocks.stack else "")
    given = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    live.ignore([*unet.parameters(), *unet.buffers(), *given])
    with torch.no_grad(), live:
        unet(**inputs)
    return live.peak, f"{live.peak_op.removeprefix('aten.')} in {live.peak_context}"


def measure(model: str = "sdxl-base", dtype: torch.dtype = torch.float16, height: int | None = None, batch: int = 2,
            keep_ratio: float = 0.37, tome_keep: float | None = 0.4536, configs=tuple(CONFIGS),
            budgets_mib=(None,), paths=PATHS) -> tuple[list[dict], dict]:
    """One row per variant, path and chunk budget (``None``: the package's): ``variant``, ``path``,
    ``budget_mib``, ``peak`` (bytes above weights and inputs), ``where``; and what was modelled."""
    factor = vae_factor(model)
    unet = build_unet(model, device="meta", dtype=dtype)
    height = height or unet.config.sample_size * factor
    inputs = unet_inputs(unet, batch, height // factor, height // factor, device="meta", dtype=dtype)
    info = {"model": model, "dtype": str(dtype).removeprefix("torch."), "height": height, "batch": batch,
            "weights": sum(p.numel() * p.element_size() for p in unet.parameters())}
    schedule = ac.make_schedule("atedm", 50, keep_ratio=keep_ratio)
    blocks = _Blocks(unet)
    rows = []

    def row(variant, path="-", budget=None):
        size, where = peak(unet, inputs, blocks)
        rows.append({"variant": variant, "path": path, "budget_mib": budget, "peak": size, "where": where})

    default_budget = attention.MAP_CHUNK_BYTES
    try:
        with gpu_kernels():
            row("full")
            for label in configs:
                runner = ac.apply(unet, schedule, CONFIGS[label])
                runner.start(schedule.num_steps)
                try:
                    for phase in schedule.phases:
                        runner.use_phase(phase.name)
                        for path in paths:
                            for budget in (budgets_mib if path == "chunked" else [None]):
                                attention.MAP_CHUNK_BYTES = int(budget * 2**20) if budget else default_budget
                                with attention.attention_path(path):
                                    row(f"{phase.name} ({label})", path,
                                        (budget or default_budget / 2**20) if path == "chunked" else None)
                finally:
                    attention.MAP_CHUNK_BYTES = default_budget
                    ac.remove(unet)
            if tome_keep is not None:
                runner = ac.apply(unet, ac.make_schedule("uniform", 1, keep_ratio=tome_keep), ToMeConfig())
                runner.start(1)
                try:
                    row(f"ToMe (keep {tome_keep:g})")
                finally:
                    ac.remove(unet)
    finally:
        blocks.remove()
    return rows, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-base", help="U-Net config name (default: sdxl-base)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--height", type=int, default=None, help="default: the model's own image size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep-ratio", type=float, default=0.37)
    parser.add_argument("--tome-keep", type=float, default=0.4536,
                        help="ToMe's keep ratio (gpu_latency.py's, at the pruned phase's MACs on sdxl-base 1024 px)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--map-chunk-mib", type=float, nargs="+", default=[attention.MAP_CHUNK_BYTES / 2**20],
                        help="chunked map budgets to model (default: the package's)")
    args = parser.parse_args(argv)
    try:
        unet_config(args.model)
        ac.make_schedule("atedm", 50, keep_ratio=args.keep_ratio)
        if any(budget <= 0 for budget in args.map_chunk_mib):
            raise ValueError(f"--map-chunk-mib {args.map_chunk_mib}: budgets must be positive")
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    started = time.perf_counter()
    rows, info = measure(args.model, DTYPES[args.dtype], args.height, args.batch, args.keep_ratio, args.tome_keep,
                         args.configs, args.map_chunk_mib)
    mib = 2**20
    digits = 0 if rows[0]["peak"] > 100 * mib else 2
    print(f"{info['model']} at {info['height']}x{info['height']} px, batch {info['batch']}, {args.dtype}; weights "
          f"{info['weights'] / mib:,.0f} MiB; activations modelled on the meta device as a CUDA GPU would hold them "
          f"(flash attention), {time.perf_counter() - started:.0f} s")
    header = f"{'variant':<22} {'map path':<8} {'chunk MiB':>9} {'peak MiB':>9} {'vs full':>8}  where"
    print(header)
    print("-" * len(header))
    full = rows[0]["peak"]
    for r in rows:
        budget = "-" if r["budget_mib"] is None else f"{r['budget_mib']:g}"
        change = "" if r["variant"] == "full" else f"{(r['peak'] - full) / mib:+.{digits}f}"
        size = f"{r['peak'] / mib:,.{digits}f}"
        print(f"{r['variant']:<22} {r['path']:<8} {budget:>9} {size:>9} {change:>8}  {r['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
