import dataclasses
import math

import pytest
import torch

from atedm_compile.config import DEFAULT_PRUNING, PAPER_PRUNING, SCORERS, PruningConfig
from atedm_compile.models import build_unet
from atedm_compile.modules import TokenSelector
from atedm_compile.passes import (expose_attention_map, insert_token_pruning, insert_token_recovery,
                                  pruning_passes, run_passes)
from atedm_compile.tracing import node_with_role, trace_block

from reference import pruned_block


def _pruned(block, keep, config=PAPER_PRUNING):
    return run_passes(trace_block(block), pruning_passes(keep, config))


def _run_capturing(gm, inputs):
    """The pruned block's output and the kept indices its selector chose: ([B, C, H, W], [B, k])."""
    captured = {}
    gm.get_submodule("atedm_selector").capture = captured
    try:
        with torch.no_grad():
            (out,) = gm(*inputs)
    finally:
        gm.get_submodule("atedm_selector").capture = None
    return out, captured[""]


@pytest.mark.parametrize("config", [PruningConfig(), PruningConfig(recovery="delta", similarity="key-cosine",
                                                                     neighbours=3),
                                    PruningConfig(recovery="delta", similarity="key-cosine", cell=2),
                                    PruningConfig(recovery="layer-delta", cell=2, fill="distinct")])
def test_keep_one_is_identity(level2_block, block_inputs, config):
    gm = _pruned(level2_block, 1.0, config)
    assert node_with_role(gm, "kept_indices") is None
    torch.testing.assert_close(gm(*block_inputs)[0], level2_block(*block_inputs, return_dict=False)[0],
                               atol=1e-5, rtol=0)


def test_matches_independent_eager_reference(level2_block, block_inputs):
    expected, expected_index = pruned_block(level2_block, *block_inputs, keep_ratio=0.37)
    out, kept = _run_capturing(_pruned(level2_block, 0.37), block_inputs)
    assert torch.equal(kept, expected_index)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [PruningConfig(), DEFAULT_PRUNING,
                                    PruningConfig(recovery="layer-delta", cell=3, fill="distinct")])
def test_pruned_block_is_differentiable(level2_block, block_inputs, config):
    # Inference is the use, but a graph that raises under autograd (in-place attention) is a trap.
    gm = _pruned(level2_block, 0.5, config)
    x = block_inputs[0].clone().requires_grad_(True)
    (out,) = gm(x, block_inputs[1])
    out.square().sum().backward()
    with torch.no_grad():
        expected = gm(*block_inputs)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_matches_reference_level3_with_direct_copy(tiny_unet):
    block = tiny_unet.mid_block.attentions[0]
    x, text = torch.randn(1, 128, 8, 8), torch.randn(1, 77, 64)
    expected, _ = pruned_block(block, x, text, keep_ratio=0.5, recovery="direct-copy")
    (out,) = _pruned(block, 0.5, PruningConfig(recovery="direct-copy"))(x, text)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("similarity", ["attention", "key-cosine"])
@pytest.mark.parametrize("neighbours", [1, 3])
def test_delta_recovery_matches_reference(level2_block, block_inputs, similarity, neighbours):
    config = PruningConfig(recovery="delta", similarity=similarity, neighbours=neighbours)
    expected, _ = pruned_block(level2_block, *block_inputs, keep_ratio=0.37, recovery="delta",
                               similarity=similarity, neighbours=neighbours)
    with torch.no_grad():
        (out,) = _pruned(level2_block, 0.37, config)(*block_inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fill", ["score", "distinct"])
@pytest.mark.parametrize("cell,keep", [(2, 0.37), (2, 0.2), (3, 0.37)])  # 0.2: fewer kept than patches; 3: cut patches
def test_cells_match_reference(level2_block, block_inputs, cell, keep, fill):
    config = PruningConfig(recovery="delta", similarity="key-cosine", cell=cell, fill=fill)
    expected, expected_index = pruned_block(level2_block, *block_inputs, keep_ratio=keep, recovery="delta",
                                            similarity="key-cosine", cell=cell, fill=fill)
    gm = _pruned(level2_block, keep, config)
    out, kept = _run_capturing(gm, block_inputs)
    # The same tokens (the order of the distinct ones may differ between near-equal cosines).
    assert torch.equal(kept.sort().values, expected_index.sort().values)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if fill == "distinct" and keep > 0.25:  # the fill changes which tokens are kept
        _, by_score = pruned_block(level2_block, *block_inputs, keep_ratio=keep, cell=cell)
        assert not torch.equal(kept.sort().values, by_score.sort().values)
    side = block_inputs[0].shape[-1]
    if keep == 0.37 and cell == 2:  # more kept than patches: every patch keeps one
        for index in kept:
            patches = {(int(i) // side // 2, int(i) % side // 2) for i in index}
            assert len(patches) == (side // 2) ** 2
    if keep == 0.2:  # fewer kept than 2 x 2 patches: the patches grow until every one keeps a token
        k = kept.shape[1]
        grown = next(c for c in range(cell, side + 1) if math.ceil(side / c) ** 2 <= k)
        assert grown > cell
        for index in kept:
            patches = {(int(i) // side // grown, int(i) % side // grown) for i in index}
            assert len(patches) == math.ceil(side / grown) ** 2


def _four_layer_block():
    """A block with three layers after the first, on an 8 x 8 grid, and its inputs."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=4,
                               cross_attention_dim=64, norm_num_groups=8, use_linear_projection=True)
    return block.eval().requires_grad_(False), (torch.randn(1, 32, 8, 8), torch.randn(1, 77, 64))


@pytest.mark.parametrize("where", ["level2", "four layers"])
def test_layer_delta_recovery_matches_reference(level2_block, block_inputs, where):
    if where == "level2":
        block, inputs = level2_block, block_inputs
    else:  # three later layers: the match is made three times
        block, inputs = _four_layer_block()
    expected, _ = pruned_block(block, *inputs, keep_ratio=0.37, recovery="layer-delta")
    gm = _pruned(block, 0.37, PruningConfig(recovery="layer-delta"))
    recovery = node_with_role(gm, "recovered")
    assert len(recovery.args) == 6 + len(block.transformer_blocks) - 2  # every later layer's state but the last
    with torch.no_grad():
        (out,) = gm(*inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # It is not delta recovery under another name: matching again changes the result.
    (once,) = _pruned(block, 0.37, PruningConfig(recovery="delta", similarity="key-cosine"))(*inputs)
    assert (once - out).abs().max() > 1e-3


@pytest.mark.parametrize("where", ["level2", "four layers"])
def test_merge_delta_recovery_matches_reference(level2_block, block_inputs, where):
    if where == "level2":
        block, inputs = level2_block, block_inputs
    else:  # three later layers run on the cluster means
        block, inputs = _four_layer_block()
    config = PruningConfig(recovery="merge-delta", similarity="key-cosine", cell=3, fill="distinct")
    expected, expected_index = pruned_block(block, *inputs, keep_ratio=0.2, recovery="merge-delta",
                                            similarity="key-cosine", cell=3, fill="distinct")
    gm = _pruned(block, 0.2, config)
    merged = node_with_role(gm, "kept_merged")
    assert merged.args[0] is node_with_role(gm, "pruned")
    assert node_with_role(gm, "recovered").args[-1] is merged  # the update is final minus the means
    out, kept = _run_capturing(gm, inputs)
    assert torch.equal(kept.sort().values, expected_index.sort().values)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # Not delta under another name: the later layers ran on the means.
    (delta,) = _pruned(block, 0.2, dataclasses.replace(config, recovery="delta"))(*inputs)
    assert (delta - out).abs().max() > 1e-3


def test_merge_delta_keeping_everything_is_the_block(level2_block, block_inputs):
    config = PruningConfig(recovery="merge-delta", similarity="key-cosine", cell=3, fill="distinct")
    gm = _pruned(level2_block, 0.999, config)  # k = N: rewritten, every token kept and its own cluster
    assert node_with_role(gm, "kept_merged") is not None
    with torch.no_grad():
        (out,) = gm(*block_inputs)
        expected = level2_block(*block_inputs[:1], encoder_hidden_states=block_inputs[1]).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_layer_delta_before_ff_starts_from_the_first_layers_output(level2_block, block_inputs):
    gm = _pruned(level2_block, 0.37, PruningConfig(recovery="layer-delta", prune_point="before-ff"))
    recovery = node_with_role(gm, "recovered")
    # The kept tokens before the first FF, after it (the first layer's output), then the last layer's.
    assert recovery.args[5] is node_with_role(gm, "pruned") and recovery.args[6] is node_with_role(gm, "layer_out")
    with torch.no_grad():
        (out,) = gm(*block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()


def test_delta_recovery_matches_reference_level3(tiny_unet):
    block = tiny_unet.mid_block.attentions[0]
    x, text = torch.randn(1, 128, 8, 8), torch.randn(1, 77, 64)
    expected, _ = pruned_block(block, x, text, keep_ratio=0.5, recovery="delta", neighbours=4)
    with torch.no_grad():
        (out,) = _pruned(block, 0.5, PruningConfig(recovery="delta", neighbours=4))(x, text)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_later_layers_run_on_kept_tokens_only(level2_block, block_inputs):
    gm = _pruned(level2_block, 0.25)
    seen = []
    hook = level2_block.transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    try:
        out = gm(*block_inputs)[0]
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 64, 64])]  # k = 0.25 * 256
    assert out.shape == block_inputs[0].shape


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("prune_point", ["after-ff", "before-ff"])
def test_every_scorer_runs(level2_block, block_inputs, scorer, prune_point):
    gm = _pruned(level2_block, 0.37, PruningConfig(scorer=scorer, prune_point=prune_point))
    out, index = _run_capturing(gm, block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()
    assert index.shape == (2, 95) and index.dtype == torch.int64
    assert all(len(set(row.tolist())) == 95 for row in index)


def test_before_ff_runs_the_first_ff_on_kept_tokens(level2_block, block_inputs):
    gm = _pruned(level2_block, 0.25, PruningConfig(prune_point="before-ff"))
    seen = []
    hook = level2_block.transformer_blocks[0].ff.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    try:
        gm(*block_inputs)
    finally:
        hook.remove()
    assert seen == [torch.Size([2, 64, 64])]


def test_kept_set_follows_the_scores(level2_block, block_inputs):
    gm = _pruned(level2_block, 0.37)
    _, first = _run_capturing(gm, block_inputs)
    _, flipped = _run_capturing(gm, (block_inputs[0].flip(-1), block_inputs[1]))
    assert not torch.equal(first, flipped)
    assert torch.equal(first, _run_capturing(gm, block_inputs)[1])


def test_random_scorer_follows_its_seed(level2_block, block_inputs):
    kept = []
    for seed in (0, 0, 1):
        gm = _pruned(level2_block, 0.37, PruningConfig(scorer="random", seed=seed))
        kept.append(_run_capturing(gm, block_inputs)[1])
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


def test_skips_single_layer_blocks():
    unet = build_unet({**build_unet("tiny", device="meta").config, "transformer_layers_per_block": [1, 1, 1]})
    gm = _pruned(unet.down_blocks[1].attentions[0], 0.37)
    assert node_with_role(gm, "kept_indices") is None
    assert not any(isinstance(m, TokenSelector) for m in gm.modules())


def test_idempotent(level2_block, block_inputs):
    gm = _pruned(level2_block, 0.37)
    code = gm.code
    again = run_passes(gm, pruning_passes(0.37, PAPER_PRUNING))  # the config _pruned ran
    assert again.code == code


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan"), True])
def test_keep_ratio_outside_range_is_refused(level2_block, keep):
    gm = expose_attention_map(trace_block(level2_block))
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        insert_token_pruning(gm, keep)


def test_pruning_needs_the_exposed_map(level2_block):
    with pytest.raises(ValueError, match="expose_attention_map"):
        insert_token_pruning(trace_block(level2_block), 0.5)


def test_recovery_without_pruning_changes_nothing(level2_block):
    gm = trace_block(level2_block)
    code = gm.code
    assert insert_token_recovery(gm).code == code


@pytest.mark.parametrize("field,value", [("scorer", "pagerank"), ("recovery", "copy"), ("prune_point", "middle"),
                                         ("head_reduction", "max"), ("similarity", "l2"), ("iterations", 0),
                                         ("neighbours", 0), ("neighbours", 1.5), ("cell", 0), ("cell", 17),
                                         ("cell", True), ("fill", "far")])
def test_bad_config_names_the_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        PruningConfig(**{field: value})


def test_distinct_fill_needs_cells():
    with pytest.raises(ValueError, match="fill='distinct' .* needs cell > 1"):
        PruningConfig(fill="distinct")


@pytest.mark.parametrize("prune_point", ["after-ff", "before-ff"])
@pytest.mark.parametrize("selection", [dict(), dict(cell=3, fill="score"), dict(cell=3, fill="distinct")],
                         ids=["top-k", "cells", "distinct"])
@pytest.mark.parametrize("scorer", ["gwpr", "random", "ca-entropy"])
def test_every_scorer_and_selection_makes_a_graph_in_order(level2_block, block_inputs, scorer, selection, prune_point):
    # The scorer follows the map it reads (random scores: the pruning point), the selection the
    # scores (and the point where it reads the values): every order must be a valid graph.
    config = PruningConfig(scorer=scorer, prune_point=prune_point, recovery="delta", similarity="key-cosine",
                           **selection)
    gm = _pruned(level2_block, 0.37, config)
    gm.graph.lint()
    order = {node: place for place, node in enumerate(gm.graph.nodes)}
    scores, index, pruned = (node_with_role(gm, role) for role in ("token_scores", "kept_indices", "pruned"))
    assert order[scores] < order[index] < order[pruned]
    with torch.no_grad():
        (out,) = gm(*block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()


def test_the_passes_default_to_what_apply_runs(level2_block, block_inputs):
    # One default everywhere: pruning_passes, insert_token_pruning and insert_token_recovery take
    # DEFAULT_PRUNING, as apply does; the paper's AT-EDM is PAPER_PRUNING, asked for by name.
    import inspect

    for function in (pruning_passes, insert_token_pruning, insert_token_recovery):
        assert inspect.signature(function).parameters["config"].default is DEFAULT_PRUNING
    by_default = run_passes(trace_block(level2_block), pruning_passes(0.37))
    torch.testing.assert_close(by_default(*block_inputs)[0], _pruned(level2_block, 0.37, DEFAULT_PRUNING)(*block_inputs)[0],
                               atol=0, rtol=0)
    assert PAPER_PRUNING == PruningConfig() and PAPER_PRUNING.recovery == "similarity"
