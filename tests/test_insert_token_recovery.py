import pytest
import torch

from atedm_compile.config import RECOVERIES, PruningConfig
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
    recovered = node_with_role(gm, "recovered")
    assert recovered.args[-1] is node_with_role(gm, "self_attention_keys")


def test_scoring_and_recovery_share_one_head_combined_map(level2_block):
    gm = _pruned(level2_block, PruningConfig())
    combined = node_with_role(gm, "self_attention_map")
    assert combined.meta["head_reduction"] == "mean"
    assert node_with_role(gm, "kept_indices").args[1] is combined
    assert node_with_role(gm, "recovered").args[-1] is combined


@pytest.mark.parametrize("prune_point", ["after-ff", "before-ff"])
def test_delta_reads_the_kept_tokens_at_the_pruning_point(level2_block, block_inputs, prune_point):
    gm = _pruned(level2_block, PruningConfig(recovery="delta", prune_point=prune_point))
    recovered, pruned = node_with_role(gm, "recovered"), node_with_role(gm, "pruned")
    assert recovered.args[-1] is pruned and recovered.args[2] is pruned.args[0]
    (out,) = gm(*block_inputs)
    assert out.shape == block_inputs[0].shape and torch.isfinite(out).all()
