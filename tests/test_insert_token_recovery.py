import pytest
import torch

from atedm_compile.config import DEFAULT_PRUNING, RECOVERIES, PruningConfig
from atedm_compile.passes import pruning_passes, run_passes
from atedm_compile.tracing import node_with_role, trace_block


def _pruned(block, config):
    return run_passes(trace_block(block), pruning_passes(0.37, config))


@pytest.mark.parametrize("recovery", RECOVERIES)
def test_every_recovery_gives_the_full_grid(level2_block, block_inputs, recovery):
    gm = _pruned(level2_block, PruningConfig(recovery=recovery))
    recovered = node_with_role(gm, "recovered")
    assert recovered is not None
    assert [u.target for u in recovered.users] == ["proj_out"]
    (out,) = gm(*block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()


def test_recovery_methods_differ(level2_block, block_inputs):
    outs = {r: _pruned(level2_block, PruningConfig(recovery=r))(*block_inputs)[0] for r in RECOVERIES}
    outs["key-cosine"] = _pruned(level2_block, PruningConfig(similarity="key-cosine"))(*block_inputs)[0]
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_key_cosine_recovery_uses_the_first_layers_keys(level2_block):
    gm = _pruned(level2_block, PruningConfig(similarity="key-cosine"))
    match = node_with_role(gm, "kept_match")
    assert match.args == (node_with_role(gm, "kept_indices"), node_with_role(gm, "self_attention_keys"))
    assert node_with_role(gm, "recovered").args[4] is match


def test_scoring_and_recovery_share_one_head_combined_map(level2_block):
    gm = _pruned(level2_block, PruningConfig())
    combined = node_with_role(gm, "self_attention_map")
    assert combined.meta["head_reduction"] == "mean"
    assert node_with_role(gm, "token_scores").args[0] is combined
    assert node_with_role(gm, "kept_match").args[1] is combined
    assert set(combined.users) == {node_with_role(gm, "token_scores"), node_with_role(gm, "kept_match")}


def _order(gm):
    return {node: place for place, node in enumerate(gm.graph.nodes)}


@pytest.mark.parametrize("config", [PruningConfig(), PruningConfig(recovery="delta", neighbours=3),
                                    PruningConfig(similarity="key-cosine"), DEFAULT_PRUNING,
                                    PruningConfig(cell=3), PruningConfig(prune_point="before-ff")],
                         ids=["paper", "delta-attention-3", "key-cosine", "default", "cell-3", "before-ff"])
def test_the_map_is_freed_before_the_first_layers_ff(level2_block, config):
    # On a GPU the [B, N, N] map is the largest thing a pruned step holds: its last reader (the
    # scorer, the recovery's match) must run before the layer's FF, whose activations would
    # otherwise come on top of it. Only the distinct fill, which reads the values after the FF,
    # chooses the kept tokens after it; the map is gone by then unless the recovery reads it.
    gm = _pruned(level2_block, config)
    order = _order(gm)
    ff = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "transformer_blocks.0.ff")
    combined = node_with_role(gm, "self_attention_map")
    assert combined.users and all(order[user] < order[ff] for user in combined.users)
    if config.recovery in ("similarity", "delta"):
        match = node_with_role(gm, "kept_match")
        assert order[match] == order[node_with_role(gm, "kept_indices")] + 1
        assert not any(isinstance(a, torch.fx.Node) and a.target == "transformer_blocks.0.attn1.to_k"
                       for a in node_with_role(gm, "recovered").args)


def test_the_distinct_fill_chooses_after_the_ff_and_scores_before_it(level2_block):
    gm = _pruned(level2_block, DEFAULT_PRUNING)
    order = _order(gm)
    ff = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "transformer_blocks.0.ff")
    assert order[node_with_role(gm, "token_scores")] < order[ff] < order[node_with_role(gm, "kept_indices")]
    assert node_with_role(gm, "kept_indices").args[1] is node_with_role(gm, "pruned").args[0]


@pytest.mark.parametrize("prune_point", ["after-ff", "before-ff"])
def test_delta_reads_the_kept_tokens_at_the_pruning_point(level2_block, block_inputs, prune_point):
    gm = _pruned(level2_block, PruningConfig(recovery="delta", prune_point=prune_point))
    recovered, pruned = node_with_role(gm, "recovered"), node_with_role(gm, "pruned")
    assert recovered.args[-1] is pruned and recovered.args[2] is pruned.args[0]
    (out,) = gm(*block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()
