"""The Triton attention map (``triton_map``, ``ops.attention_path("triton")``) against the PyTorch
forms. Without a CUDA GPU the kernels run on the CPU under Triton's interpreter; on a GPU,
``tests/test_gpu.py`` runs them compiled."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton; the [dev] extra has it on "
                                     "Linux x86-64)")

from atedm_compile import ops, triton_map  # noqa: E402
from atedm_compile.config import DEFAULT_PRUNING, PruningConfig  # noqa: E402
from atedm_compile.passes import pruning_passes, run_passes  # noqa: E402
from atedm_compile.tracing import trace_block  # noqa: E402
from counting_backend import CountingBackend  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="on a GPU, tests/test_gpu.py runs the kernels (conftest.py sets "
                                       "TRITON_INTERPRET=1 only without one)")


def _batched(q, k, v, heads, reduction="mean"):
    with ops.attention_path("batched"):
        return ops.attention_with_map(q, k, v, heads, reduction)


@pytest.mark.parametrize("reduction", ["mean", "rms"])
@pytest.mark.parametrize("shape", [(2, 33, 33, 5, 8), (2, 40, 20, 3, 24), (1, 64, 64, 2, 64)],
                         ids=["self, d 8", "cross, d 24", "self, d 64"])
def test_triton_map_equals_the_batched_map(reduction, shape):
    batch, tokens, keys, heads, head_dim = shape
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, tokens, heads * head_dim, generator=generator)
    k, v = (torch.randn(batch, keys, heads * head_dim, generator=generator) for _ in range(2))
    with ops.attention_path("triton"):
        out, combined = ops.attention_with_map(q, k, v, heads, reduction)
    expected_out, expected_map = _batched(q, k, v, heads, reduction)
    assert combined.dtype == torch.float32 and combined.shape == (batch, tokens, keys)
    torch.testing.assert_close(combined, expected_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("square", [False, True])
def test_the_kernels_own_log_sum_exp_equals_the_attention_kernels(square):
    # Where the attention kernel gives no row statistics, the second kernel computes them.
    q, k = torch.randn(2, 3, 37, 16), torch.randn(2, 3, 45, 16)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    given = triton_map.head_map(q, k, lse, square)
    computed = triton_map.head_map(q, k, None, square)
    torch.testing.assert_close(computed, given, atol=1e-6, rtol=1e-5)
    rows = computed.sum(-1) if not square else None
    if rows is not None:  # a mean of softmax rows sums to one
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_map_in_low_precision(dtype, atol):
    q, k, v = (torch.randn(2, 48, 32).to(dtype) for _ in range(3))
    with ops.attention_path("triton"):
        out, combined = ops.attention_with_map(q, k, v, 4)
    expected_out, expected_map = _batched(q.float(), k.float(), v.float(), 4)
    assert out.dtype == dtype and combined.dtype == torch.float32 and torch.isfinite(combined).all()
    torch.testing.assert_close(combined, expected_map, atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), expected_out, atol=10 * atol, rtol=0)


@pytest.mark.parametrize("config", [PruningConfig(), DEFAULT_PRUNING], ids=["paper", "default"])
def test_pruned_block_on_the_triton_path_equals_the_cpu_path(level2_block, block_inputs, config):
    gm = run_passes(trace_block(level2_block), pruning_passes(0.37, config))
    selector = gm.get_submodule("atedm_selector")
    outs, kept = {}, {}
    for path in ("per-head", "triton"):
        selector.capture = {}
        with ops.attention_path(path), torch.no_grad():
            (outs[path],) = gm(*block_inputs)
        kept[path] = selector.capture[""]
    selector.capture = None
    assert torch.equal(kept["triton"], kept["per-head"])
    torch.testing.assert_close(outs["triton"], outs["per-head"], atol=1e-5, rtol=1e-5)


def test_pruned_block_on_the_triton_path_compiles_into_one_graph(level2_block, block_inputs):
    # The map is an opaque custom op: no graph break, so no host synchronisation around it.
    torch._dynamo.reset()
    gm = run_passes(trace_block(level2_block), pruning_passes(0.37, PruningConfig()))
    backend = CountingBackend()
    with ops.attention_path("triton"), torch.no_grad():
        (expected,) = gm(*block_inputs)
        (out,) = torch.compile(gm, backend=backend, fullgraph=True)(*block_inputs)
    assert backend.graphs == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_without_the_interpreter_the_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_map.available("cpu") and triton_map.available("cuda")
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device .* got device cpu"):
        triton_map.head_map(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), None, False)


COMPILE_FOR_GPUS = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from atedm_compile import triton_map

_, row_lse, head_map = triton_map._kernels()


def signature(kernel, dtype):
    pointers = {"Q": "*" + dtype, "K": "*" + dtype, "LSE": "*fp32", "OUT": "*fp32"}
    return {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "fp32" if p.name == "scale_log2e" else "i32")
            for p in kernel.params}


for arch in (90, 80):  # the H200 (Hopper), and Ampere
    for dtype, precision in (("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "ieee")):
        for square in (False, True):
            constants = dict(H=10, D=64, D_PAD=64, BLOCK_N=64, BLOCK_M=64, SQUARE=square, PRECISION=precision)
            compiled = triton.compile(triton.compiler.ASTSource(head_map, signature(head_map, dtype), constants),
                                      target=GPUTarget("cuda", arch, 32))
            assert compiled.asm["cubin"], (arch, dtype, square)
        constants = dict(M=4096, D=40, D_PAD=64, BLOCK_N=64, BLOCK_M=64, PRECISION=precision)
        compiled = triton.compile(triton.compiler.ASTSource(row_lse, signature(row_lse, dtype), constants),
                                  target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"], (arch, dtype)
print("compiled")
"""


def test_kernels_compile_to_gpu_code_for_hopper_and_ampere():
    # Triton compiles for a named GPU without one (its own ptxas): the kernels as the GPU runs
    # them, not as the interpreter reads them. Another process: the interpreter is off there.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
