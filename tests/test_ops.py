import pytest
import torch

from atedm_compile import ops
from atedm_compile.ops import attention


# The recoveries from a whole similarity (map or keys), which the package splits into the match
# (``nearest_kept``, made early) and the recovery from it.
def copy_from_most_similar(kept, index, similarity):
    return ops.copy_nearest(kept, index, ops.nearest_kept(ops.similarity_to_kept(index, similarity))[0])


def copy_from_most_similar_key(kept, index, keys):
    return ops.copy_nearest(kept, index, ops.nearest_kept(ops.key_cosine_to_kept(index, keys))[0])


def recover_delta(kept, kept_before, index, before, to_kept, neighbours=1):
    return ops.recover_delta_nearest(kept, kept_before, index, before, *ops.nearest_kept(to_kept, neighbours))


@pytest.mark.parametrize("tokens,keep,expected", [(4096, 0.37, 1516), (1024, 0.37, 379), (10, 0.25, 3),
                                                  (10, 0.001, 1), (7, 1.0, 7)])
def test_keep_count_rounds_half_up(tokens, keep, expected):
    assert ops.keep_count(tokens, keep) == expected


def test_gwpr_ranks_the_token_everyone_attends_to_first():
    attn = torch.full((1, 5, 5), 0.05)
    attn[0, :, 3] = 0.8  # every query looks at token 3
    scores = ops.gwpr_self_attention(attn, iterations=5)
    assert scores.argmax().item() == 3
    torch.testing.assert_close(scores.sum(), torch.tensor(1.0))


def test_gwpr_weighs_votes_by_the_voters_importance():
    # Tokens 0 and 1 each get one vote; 0's voter (2) is itself important, 1's voter (4) is not.
    attn = torch.zeros(1, 5, 5)
    attn[0, 2, 0] = attn[0, 4, 1] = 1.0
    attn[0, 0, 2] = attn[0, 1, 2] = attn[0, 3, 2] = 1.0
    one = ops.gwpr_self_attention(attn, iterations=1)
    assert one[0, 0] == one[0, 1]
    more = ops.gwpr_self_attention(attn, iterations=2)
    assert more[0, 0] > more[0, 1]


@pytest.mark.parametrize("method", ops.CROSS_ATTENTION_SCORERS)
def test_cross_attention_scorers_prefer_focused_queries(method):
    # Query 0 puts all its attention on one key; query 1 spreads it uniformly.
    attn = torch.full((1, 3, 8), 0.125)
    attn[0, 0] = torch.tensor([0.93] + [0.01] * 7)
    scores = ops.gwpr_cross_attention(attn, 3, method)
    assert scores.shape == (1, 3)
    assert scores[0, 0] > scores[0, 1]


def test_unknown_cross_attention_scorer():
    with pytest.raises(ValueError, match="ca-max"):
        ops.gwpr_cross_attention(torch.rand(1, 2, 3), 1, "ca-max")


def test_rms_reduction_differs_from_mean():
    probs = torch.softmax(torch.randn(1, 4, 6, 6), -1)
    assert torch.allclose(ops.reduce_heads(probs, "mean"), probs.mean(1))
    torch.testing.assert_close(ops.reduce_heads(probs, "rms"), probs.pow(2).mean(1).sqrt())
    with pytest.raises(ValueError, match="'max'"):
        ops.reduce_heads(probs, "max")


def test_attention_matches_sdpa():
    q, k, v = torch.randn(2, 7, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    probs = ops.attention_probs(q, k, heads=2)
    expected = torch.nn.functional.scaled_dot_product_attention(
        ops.split_heads(q, 2), ops.split_heads(k, 2), ops.split_heads(v, 2)).transpose(1, 2).reshape(2, 7, 8)
    torch.testing.assert_close(ops.attend(probs, v, heads=2), expected, atol=1e-6, rtol=1e-5)


def test_similarity_copy_takes_the_most_similar_kept_token():
    kept = torch.tensor([[[10.0], [20.0]]])  # final values of tokens 1 and 3
    index = torch.tensor([[1, 3]])
    similarity = torch.tensor([[[0.0, 0.9, 0.0, 0.1],   # token 0 is closest to 1
                                [0.0, 0.1, 0.0, 0.9],   # token 1 is kept: keeps its own even so
                                [0.0, 0.2, 0.0, 0.8],   # token 2 -> 3
                                [0.0, 0.0, 0.0, 1.0]]])
    out = copy_from_most_similar(kept, index, similarity)
    assert out.flatten().tolist() == [10.0, 10.0, 20.0, 20.0]


def test_key_cosine_copy():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    kept = torch.tensor([[[5.0], [7.0]]])
    out = copy_from_most_similar_key(kept, torch.tensor([[0, 2]]), keys)
    assert out.flatten().tolist() == [5.0, 5.0, 7.0, 7.0]


def test_delta_adds_the_most_similar_kept_tokens_update():
    before = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # every token at the pruning point
    index = torch.tensor([[1, 3]])
    kept = torch.tensor([[[12.0], [34.0]]])  # final values: updates +10 (token 1) and +30 (token 3)
    to_kept = torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]]])
    out = recover_delta(kept, ops.gather_tokens(before, index), index, before, to_kept)
    assert out.flatten().tolist() == [11.0, 12.0, 33.0, 34.0]


def test_soft_delta_weighs_updates_by_similarity():
    before = torch.zeros(1, 4, 1)
    index = torch.tensor([[2, 3]])
    kept, kept_before = torch.tensor([[[10.0], [30.0]]]), torch.zeros(1, 2, 1)
    to_kept = torch.tensor([[[0.25, 0.75],     # -> 0.25 * 10 + 0.75 * 30
                             [-0.5, -0.5],     # no positive similarity: the plain mean
                             [1.0, 0.0],       # kept tokens keep their final values
                             [0.0, 1.0]]])
    out = recover_delta(kept, kept_before, index, before, to_kept, neighbours=2)
    assert out.flatten().tolist() == pytest.approx([25.0, 20.0, 10.0, 30.0])
    # More neighbours than kept tokens: all of them.
    assert torch.equal(recover_delta(kept, kept_before, index, before, to_kept, neighbours=5), out)


def test_baseline_recoveries():
    kept = torch.tensor([[[1.0], [2.0]]])
    index = torch.tensor([[0, 3]])
    assert ops.recover_zeros(kept, index, 4).flatten().tolist() == [1.0, 0.0, 0.0, 2.0]
    before = torch.tensor([[[9.0], [8.0], [7.0], [6.0]]])
    assert ops.recover_direct_copy(kept, index, before).flatten().tolist() == [1.0, 8.0, 7.0, 2.0]
    grid = ops.recover_interpolation(torch.ones(1, 8, 3), torch.arange(0, 16, 2).view(1, 8), 4, 4)
    assert grid.shape == (1, 16, 3)
    assert torch.equal(grid[0, ::2], torch.ones(8, 3))
    assert (grid[0, 1::2] != 0).all() and (grid[0, 1::2] < 1).all()


def test_random_scores_depend_on_seed_only():
    like = torch.zeros(2, 10, 3)
    assert torch.equal(ops.random_scores(like, 3), ops.random_scores(like, 3))
    assert not torch.equal(ops.random_scores(like, 3), ops.random_scores(like, 4))


@pytest.mark.parametrize("reduction", ["mean", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_map_eager_loop_equals_batched_form(reduction, dtype):
    q, k, v = (torch.randn(2, 9, 12, dtype=dtype) for _ in range(3))
    out, combined = ops.attention_with_map(q, k, v, 3, reduction)
    probs = ops.attention_probs(q, k, 3)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, ops.attend(probs, v, 3), **tolerance)
    torch.testing.assert_close(combined, ops.reduce_heads(probs, reduction).float(), **tolerance)
    assert out.dtype == dtype and combined.dtype == torch.float32


def test_attention_with_map_cross_shapes():
    out, combined = ops.attention_with_map(torch.randn(1, 6, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2)
    assert out.shape == (1, 6, 8) and combined.shape == (1, 6, 4)
    with pytest.raises(ValueError, match="'max'"):
        ops.attention_with_map(torch.randn(1, 6, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2, "max")


def _batched(q, k, v, heads, reduction="mean"):
    with ops.attention_path("batched"):
        return ops.attention_with_map(q, k, v, heads, reduction)


@pytest.mark.parametrize("reduction", ["mean", "rms"])
@pytest.mark.parametrize("keys", [33, 20])  # self-attention (M = N) and cross-attention
@pytest.mark.parametrize("chunk", [(1, 33), (2, 33), (5, 33), (1, 8), (2, 5), (5, 1), None])
def test_chunked_map_equals_batched_map(reduction, keys, chunk):
    # Whole heads, row tiles that divide N or leave a short last tile, one row at a time.
    q, k, v = torch.randn(2, 33, 40), torch.randn(2, keys, 40), torch.randn(2, keys, 40)
    out, combined = ops.attention_with_map_chunked(q, k, v, 5, reduction, chunk)
    expected_out, expected_map = _batched(q, k, v, 5, reduction)
    torch.testing.assert_close(combined, expected_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert combined.dtype == torch.float32 and combined.shape == (2, 33, keys)


def test_chunked_map_reads_only_the_real_rows_of_a_padded_log_sum_exp(monkeypatch):
    # Some kernels return the row statistics padded past N; a short last tile must not read them.
    q, k, v = (torch.randn(2, 10, 12) for _ in range(3))
    expected = ops.attention_with_map_chunked(q, k, v, 3)

    def padded(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, torch.cat([lse, torch.full_like(lse, float("nan"))], dim=-1)

    monkeypatch.setattr(attention, "fused_attention_with_lse", padded)
    out, combined = ops.attention_with_map_chunked(q, k, v, 3, chunk=(1, 4))
    torch.testing.assert_close(combined, expected[1], atol=1e-6, rtol=1e-5)


def test_chunked_map_without_a_kernel_log_sum_exp(monkeypatch):
    # Where no fused kernel returns the row statistics, each chunk computes its own.
    q, k, v = (torch.randn(2, 17, 24) for _ in range(3))
    expected = ops.attention_with_map_chunked(q, k, v, 3)
    calls = []

    def sdpa_only(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), None

    monkeypatch.setattr(attention, "fused_attention_with_lse", sdpa_only)
    out, combined = ops.attention_with_map_chunked(q, k, v, 3, chunk=(2, 17))
    assert calls == [(2, 3, 17, 8)]
    torch.testing.assert_close(combined, expected[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_chunked_map_in_low_precision(dtype, atol):
    q, k, v = (torch.randn(2, 64, 32).to(dtype) for _ in range(3))
    out, combined = ops.attention_with_map_chunked(q, k, v, 4)
    expected_out, expected_map = _batched(q.float(), k.float(), v.float(), 4)
    assert out.dtype == dtype and combined.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(combined).all()
    torch.testing.assert_close(combined, expected_map, atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), expected_out, atol=10 * atol, rtol=0)


@pytest.mark.parametrize("path", ["auto", "per-head", "chunked", "batched"])
def test_attention_with_map_is_differentiable_on_every_path(path):
    # The per-head and chunked forms write in place; where autograd records, the plain form runs.
    q, k, v = (torch.randn(2, 9, 12, requires_grad=True) for _ in range(3))
    with ops.attention_path(path):
        out, combined = ops.attention_with_map(q, k, v, 3)
        (out.sum() + combined.square().sum()).backward()
    with torch.no_grad():
        expected_out, expected_map = _batched(q, k, v, 3)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(combined, expected_map, atol=1e-6, rtol=1e-5)
    for tensor in (q, k, v):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_map_chunks_fit_the_budget():
    # SD-XL at 1024 px, fp16, batch 2 (32 MiB of scores, fp16 and float32 together): level 2 one
    # head in 7 tiles of 586 rows (the last 580), level 3 2 heads at once, cross-attention (77
    # keys) 5 heads at once.
    assert attention.MAP_CHUNK_BYTES == 32 * 2**20
    assert ops.map_chunks(2, 4096, 4096, 10, torch.float16) == (1, 586)
    assert ops.map_chunks(2, 1024, 1024, 20, torch.float16) == (2, 1024)
    assert ops.map_chunks(2, 4096, 77, 10, torch.float16) == (5, 4096)
    assert ops.map_chunks(2, 4096, 4096, 10, torch.float32) == (1, 512)
    for args in [(2, 4096, 4096, 10, torch.float16), (2, 1024, 1024, 20, torch.bfloat16), (1, 999, 999, 7, torch.float32),
                 (2, 65536, 65536, 10, torch.float16)]:  # one row over the budget: still one row
        heads, rows = ops.map_chunks(*args)
        batch, tokens, keys, _, dtype = args
        budget = max(attention.MAP_CHUNK_BYTES, batch * keys * 6 + 2)
        assert heads * rows * batch * keys * (dtype.itemsize + 4) <= budget


def test_attention_path_is_forced_and_restored(monkeypatch):
    q = k = v = torch.randn(1, 6, 8)
    seen = []
    monkeypatch.setattr(attention, "attention_with_map_chunked", lambda *args: seen.append(args) or (q, q))
    with ops.attention_path("chunked"):
        ops.attention_with_map(q, k, v, 2)
    assert len(seen) == 1
    ops.attention_with_map(q, k, v, 2)  # auto on the CPU, eager: the per-head loop
    assert len(seen) == 1
    with pytest.raises(ValueError, match="'fused'"):
        with ops.attention_path("fused"):
            pass


def test_cell_winners_are_each_patchs_best_with_cut_patches_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.0,
                            0.5, 0.4, 0.3, 0.8, 0.7,
                            0.6, 0.6, 0.1, 0.2, 0.9]])  # a 3 x 5 grid, 2 x 2 patches
    # Patches: rows 0-1 x cols 0-1 / 2-3 / 4, then row 2 x cols 0-1 (a tie: the first) / 2-3 / 4.
    assert ops.cell_winners(scores, 3, 5, 2).tolist() == [[1, 8, 9, 10, 13, 14]]


def test_per_cell_top_k():
    torch.manual_seed(0)
    scores = torch.rand(3, 64)
    torch.testing.assert_close(ops.select_top_k_per_cell(scores, 20, 8, 8, 1), ops.select_top_k(scores, 20))
    index = ops.select_top_k_per_cell(scores, 24, 8, 8, 2)
    winners = ops.cell_winners(scores, 8, 8, 2)
    for b in range(3):
        first = index[b, :16]
        assert set(first.tolist()) == set(winners[b].tolist())  # every patch keeps its best
        assert torch.all(scores[b, first][:-1] >= scores[b, first][1:])  # by score
        rest = [i for i in torch.argsort(scores[b], descending=True).tolist() if i not in set(first.tolist())][:8]
        assert index[b, 16:].tolist() == rest
    fewer = ops.select_top_k_per_cell(scores, 5, 8, 8, 2)  # fewer kept than patches: the 5 best winners
    for b in range(3):
        best = winners[b][torch.argsort(scores[b, winners[b]], descending=True)[:5]]
        assert fewer[b].tolist() == best.tolist()
