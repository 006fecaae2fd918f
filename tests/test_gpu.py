"""On a CUDA GPU only (skipped elsewhere): the chunked map from the flash kernel's statistics, its
memory, no host synchronisation in a pruned block, phases on the GPU against the CPU, compiled
blocks and phase switches under CUDA graphs. ``benchmarks/gpu_check.sh`` runs these."""

import pytest
import torch

import atedm_compile as ac
from atedm_compile import ops
from atedm_compile.config import PruningConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.models import build_unet
from atedm_compile.passes import ToMeConfig, pruning_passes, run_passes
from atedm_compile.tracing import trace_block

from test_compile import MID_ONLY_UNET, TWO_PHASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    # TF32 convolutions would blur the fp32 comparisons with the CPU.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _qkv(batch, tokens, heads, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, heads * head_dim, generator=generator).to(CUDA, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_kernel_statistics_give_the_map(dtype):
    q, k, v = _qkv(2, 1024, 10, 64, dtype)
    heads = [ops.split_heads(t, 10) for t in (q, k, v)]
    _, lse = ops.fused_attention_with_lse(*heads)
    assert lse is not None and lse.dtype == torch.float32  # the flash kernel's, not recomputed
    scores = heads[0].float() @ heads[1].float().transpose(-1, -2) / 8.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=2e-3, rtol=0)
    out, combined = ops.attention_with_map_chunked(q, k, v, 10)
    with ops.attention_path("batched"):
        expected_out, expected_map = ops.attention_with_map(q.float().cpu(), k.float().cpu(), v.float().cpu(), 10)
    torch.testing.assert_close(combined.cpu(), expected_map, atol=5e-4 if dtype == torch.float16 else 3e-3, rtol=0)
    torch.testing.assert_close(out.float().cpu(), expected_out, atol=2e-2, rtol=0)


def _extra_memory(call):
    """Bytes ``call()`` allocates at its peak above what was allocated before, after a warm-up
    call (kernels, workspaces), and its result."""
    call()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


def test_chunked_map_memory_is_one_buffer_and_one_chunk():
    # SD-XL level 2 at 1024 px, fp16, batch 2: the batched form would hold 2 x 10 x 4096^2 float32
    # probabilities (1.3 GB); the chunked form one float32 map and one chunk's scores.
    batch, tokens, heads = 2, 4096, 10
    q, k, v = _qkv(batch, tokens, heads, 64, torch.float16)
    extra, (out, combined) = _extra_memory(lambda: ops.attention_with_map_chunked(q, k, v, heads))
    chunk_heads, rows = ops.map_chunks(batch, tokens, tokens, heads, torch.float16)
    map_bytes = batch * tokens * tokens * 4
    chunk_bytes = chunk_heads * rows * batch * tokens * (2 + 4)  # scores, then in float32
    small = 2 * q.numel() * 2 + 32 * 2**20  # output, kernel workspace
    print(f"extra memory {extra / 2**20:.0f} MiB: map {map_bytes / 2**20:.0f}, chunk {chunk_bytes / 2**20:.0f}")
    assert extra <= map_bytes + chunk_bytes + small
    assert torch.isfinite(combined).all()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 5e-4), (torch.bfloat16, 3e-3)])
def test_triton_map_equals_the_batched_map(dtype, atol):
    pytest.importorskip("triton")
    q, k, v = _qkv(2, 1024, 10, 64, dtype)
    with ops.attention_path("triton"):
        out, combined = ops.attention_with_map(q, k, v, 10)
    with ops.attention_path("batched"):
        expected_out, expected_map = ops.attention_with_map(q.float().cpu(), k.float().cpu(), v.float().cpu(), 10)
    assert combined.dtype == torch.float32 and torch.isfinite(combined).all()
    torch.testing.assert_close(combined.cpu(), expected_map, atol=atol, rtol=0)
    torch.testing.assert_close(out.float().cpu(), expected_out, atol=max(atol, 2e-2 if dtype != torch.float32 else 0),
                               rtol=0)


def test_triton_map_memory_is_the_map_alone():
    pytest.importorskip("triton")
    batch, tokens, heads = 2, 4096, 10
    q, k, v = _qkv(batch, tokens, heads, 64, torch.float16)
    with ops.attention_path("triton"):  # the warm-up call compiles the kernels
        extra, (out, combined) = _extra_memory(lambda: ops.attention_with_map(q, k, v, heads))
    map_bytes = batch * tokens * tokens * 4
    print(f"extra memory {extra / 2**20:.0f} MiB: map {map_bytes / 2**20:.0f}")
    assert extra <= map_bytes + 3 * q.numel() * 2 + 32 * 2**20
    assert torch.isfinite(combined).all()


def test_triton_path_pruned_block_compiles_and_makes_no_host_synchronisation():
    pytest.importorskip("triton")
    torch._dynamo.reset()
    unet = build_unet("tiny", device=CUDA, dtype=torch.float16)
    gm = _pruned_block(unet.down_blocks[1].attentions[0], PruningConfig())
    x = torch.randn(2, 64, 16, 16, device=CUDA, dtype=torch.float16)
    text = torch.randn(2, 77, 64, device=CUDA, dtype=torch.float16)
    with ops.attention_path("triton"), torch.no_grad():
        gm(x, text)  # warm-up: compiles the kernels
        torch.cuda.set_sync_debug_mode("error")
        try:
            (expected,) = gm(x, text)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        (out,) = torch.compile(gm, fullgraph=True)(x, text)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    assert torch.isfinite(out).all()


def _pruned_block(block, config, keep=0.37):
    return run_passes(trace_block(block), pruning_passes(keep, config))


@pytest.mark.parametrize("config", [PruningConfig(), PruningConfig(similarity="key-cosine"),
                                    PruningConfig(recovery="interpolation"), ToMeConfig()], ids=str)
def test_pruned_block_makes_no_host_synchronisation(config):
    unet = build_unet("tiny", device=CUDA, dtype=torch.float16)
    block = unet.down_blocks[1].attentions[0]
    gm = _pruned_block(block, config, 0.5)
    x = torch.randn(2, 64, 16, 16, device=CUDA, dtype=torch.float16)
    text = torch.randn(2, 77, 64, device=CUDA, dtype=torch.float16)
    with torch.no_grad():
        gm(x, text)  # warm-up (ToMe keeps its grid split from here)
        torch.cuda.set_sync_debug_mode("error")
        try:
            (out,) = gm(x, text)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def _to(inputs, device):
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    return inputs.to(device)


def test_unet_phases_on_the_gpu_match_the_cpu():
    cpu = build_unet("tiny")
    gpu = build_unet("tiny").to(CUDA)  # the same weights
    inputs = unet_inputs(cpu, 2, 32, 32, device="cpu")
    runners = {name: ac.apply(unet, "atedm", keep_ratio=0.37) for name, unet in (("cpu", cpu), ("gpu", gpu))}
    try:
        for phase in (None, "prune-less", "pruned"):
            outs, kept = {}, {}
            for name, unet in (("cpu", cpu), ("gpu", gpu)):
                runners[name].start(10)
                runners[name].use_phase(phase)
                with runners[name].capture_kept_tokens() as captured, torch.no_grad():
                    outs[name] = unet(**_to(inputs, next(unet.parameters()).device)).sample.cpu()
                kept[name] = {block: index.cpu() for block, index in captured.items()}
            assert torch.isfinite(outs["gpu"]).all()
            if phase is None:
                torch.testing.assert_close(outs["gpu"], outs["cpu"], atol=1e-4, rtol=1e-4)
                continue
            assert set(kept["gpu"]) == set(kept["cpu"])
            for block, index in kept["cpu"].items():  # near-ties may flip a token or two
                same = [len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(index, kept["gpu"][block])]
                assert min(same) >= 0.95, (phase, block, same)
    finally:
        ac.remove(cpu)
        ac.remove(gpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_phase_runs_in_low_precision(dtype):
    unet = build_unet("tiny", device=CUDA, dtype=dtype)
    runner = ac.apply(unet, "atedm", keep_ratio=0.37)
    runner.start(10)
    inputs = unet_inputs(unet, 2, 32, 32, device=CUDA, dtype=dtype)
    with torch.no_grad():
        for phase in (None, "prune-less", "pruned"):
            runner.use_phase(phase)
            out = unet(**inputs).sample
            assert out.dtype == dtype and torch.isfinite(out).all(), phase


def test_inductor_compiles_a_pruned_block():
    torch._dynamo.reset()
    unet = build_unet("tiny", device=CUDA, dtype=torch.float16)
    gm = _pruned_block(unet.down_blocks[1].attentions[0], PruningConfig())
    x = torch.randn(2, 64, 16, 16, device=CUDA, dtype=torch.float16)
    text = torch.randn(2, 77, 64, device=CUDA, dtype=torch.float16)
    with torch.no_grad():
        (expected,) = gm(x, text)
        (out,) = torch.compile(gm, fullgraph=True)(x, text)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


def test_phase_switch_under_cuda_graphs_does_not_recompile():
    torch._dynamo.reset()
    unet = build_unet(MID_ONLY_UNET, device=CUDA, dtype=torch.float16)
    inputs = unet_inputs(unet, 2, 16, 16, device=CUDA, dtype=torch.float16)
    runner = ac.apply(unet, TWO_PHASES)
    runner.start(4)
    try:
        expected = {}
        with torch.no_grad():
            for phase in ("light", "heavy"):
                runner.use_phase(phase)
                expected[phase] = unet(**inputs).sample.clone()
            runner.compile(backend="cudagraphs")  # aot_eager with CUDA graph trees
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for phase in ["light", "heavy", "light", "heavy", "light", "heavy"]:
                runner.use_phase(phase)
                out = unet(**inputs).sample.clone()
                torch.testing.assert_close(out, expected[phase], atol=1e-2, rtol=1e-2)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2
    finally:
        ac.remove(unet)
