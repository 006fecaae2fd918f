import pytest
import torch

from atedm_compile import tome
from atedm_compile.models import build_unet
from atedm_compile.config import ToMeConfig
from atedm_compile.modules import TokenMatching
from atedm_compile.passes.insert_token_merging import insert_token_merging
from atedm_compile.tracing import attention_blocks, trace_block

FIXED = ToMeConfig(destination="fixed")


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny")


def _unet_inputs(batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 32, 32, generator=generator), torch.tensor(500)), {
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        },
    }


def _block_inputs(channels=64, size=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=generator), torch.randn(2, 77, 64, generator=generator)


def _run_with_graphs(unet, graphs, args, kwargs):
    """The U-Net's output with each attention block's forward replaced by its graph (path -> graph)."""
    modules = [unet.get_submodule(path) for path in graphs]
    for module, gm in zip(modules, graphs.values()):
        module.forward = lambda hidden, encoder_hidden_states=None, _gm=gm, **_: _gm(hidden, encoder_hidden_states)
    try:
        return unet(*args, **kwargs).sample
    finally:
        for module in modules:
            del module.forward


@pytest.mark.parametrize("height, width, ratio", [(8, 8, 0.5), (16, 16, 0.75), (5, 7, 0.4)])
def test_merge_and_unmerge_match_tomesd(height, width, ratio):
    merge = pytest.importorskip("tomesd.merge", reason="tomesd is a test dependency (pip install tomesd)")
    generator = torch.Generator().manual_seed(0)
    metric, x = torch.randn(2, 2, height * width, 16, generator=generator)
    r = tome.merge_count(height * width, ratio)
    their_merge, their_unmerge = merge.bipartite_soft_matching_random2d(metric, width, height, 2, 2, r, no_rand=True)
    matching = tome.bipartite_soft_matching(metric, height, width, r)

    # tomesd orders the merged tokens by an unstable argsort: compare them where each token lands.
    merged = tome.merge_tokens(x, matching)
    assert merged.shape == their_merge(x).shape
    torch.testing.assert_close(tome.unmerge_tokens(merged.tanh(), matching), their_unmerge(their_merge(x).tanh()))


def test_fixed_destination_is_the_top_left_token_of_each_cell():
    destinations, sources = tome.split_destinations(4, 5, 2, 2, tome.destination_offsets(2, 2, 2, 2, seed=None))
    assert destinations.tolist() == [0, 2, 10, 12]
    assert sorted(destinations.tolist() + sources.tolist()) == list(range(20))
    assert sources.tolist() == sorted(sources.tolist())


def test_random_destinations_are_one_per_cell_and_follow_the_seed():
    def cells(seed):
        destinations, _ = tome.split_destinations(8, 8, 2, 2, tome.destination_offsets(4, 4, 2, 2, seed))
        return destinations

    destinations = cells(3)
    assert sorted(((destinations // 8) // 2 * 4 + (destinations % 8) // 2).tolist()) == list(range(16))
    assert torch.equal(destinations, cells(3))
    assert not torch.equal(destinations, cells(4))
    assert not torch.equal(destinations, cells(None))


@pytest.mark.parametrize(
    "sublayers", [("self-attention", "cross-attention", "ff"), ("self-attention",)], ids=["all", "self-attention"]
)
def test_unet_output_matches_tomesd(unet, sublayers):
    tomesd = pytest.importorskip("tomesd", reason="tomesd is a test dependency (pip install tomesd)")
    args, kwargs = _unet_inputs(batch=1)
    config = ToMeConfig(sublayers=sublayers, destination="fixed")
    graphs = {b.path: insert_token_merging(trace_block(unet.get_submodule(b.path), b.name), 0.5, config, b.name)
              for b in attention_blocks(unet)}
    # max_downsample=4 reaches level 3 (8x8 of the 32x32 latent): every block merges, as ours.
    flags = {"merge_attn": "self-attention" in sublayers, "merge_crossattn": "cross-attention" in sublayers,
             "merge_mlp": "ff" in sublayers}
    with torch.no_grad():
        plain = unet(*args, **kwargs).sample
        tomesd.apply_patch(unet, ratio=0.5, max_downsample=4, use_rand=False, **flags)
        try:
            theirs = unet(*args, **kwargs).sample
        finally:
            tomesd.remove_patch(unet)
        ours = _run_with_graphs(unet, graphs, args, kwargs)

    assert (theirs - plain).abs().max() > 1e-2  # merging changes the output, so the match below means something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("destination", ["fixed", "random"])
def test_exports_to_onnx_and_runs_in_onnxruntime(unet, tmp_path, destination):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    gm = insert_token_merging(trace_block(unet.down_blocks[1].attentions[0]), 0.5, ToMeConfig(destination=destination))
    hidden, context = _block_inputs()
    path = tmp_path / "tome.onnx"
    torch.onnx.export(gm, (hidden, context), str(path), dynamo=False,
                      input_names=["hidden_states", "encoder_hidden_states"], output_names=["out"])

    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"TopK", "MatMul", "GatherElements"} <= ops
    assert "NonZero" not in ops and "ScatterND" not in ops
    for node in model.graph.node:
        if node.op_type == "ScatterElements":
            assert all(a.name != "reduction" or a.s == b"none" for a in node.attribute), node
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"hidden_states": hidden.numpy(), "encoder_hidden_states": context.numpy()})
    with torch.no_grad():
        expected = gm(hidden, context)[0]
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-4)


def test_ratio_zero_is_identity(unet):
    gm = trace_block(unet.down_blocks[1].attentions[0])
    code = gm.code
    assert insert_token_merging(gm, 0.0, FIXED) is gm
    assert gm.code == code


def test_idempotent(unet):
    gm = insert_token_merging(trace_block(unet.down_blocks[1].attentions[0]), 0.5, FIXED)
    code = gm.code
    assert insert_token_merging(gm, 0.5, FIXED).code == code


def test_merges_every_layer_around_the_chosen_sublayers_only(unet):
    gm = insert_token_merging(trace_block(unet.down_blocks[1].attentions[0]), None,
                              ToMeConfig(ratio=0.25, sublayers=("cross-attention",)))
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for layer in (0, 1):
        attn1, attn2 = calls[f"transformer_blocks.{layer}.attn1"], calls[f"transformer_blocks.{layer}.attn2"]
        assert attn2.args[0].target == f"tome_merge_{layer}"
        assert [user.target for user in attn2.users] == [f"tome_unmerge_{layer}"]
        assert attn1.args[0].target == f"transformer_blocks.{layer}.norm1"
        assert gm.get_submodule(f"tome_match_{layer}").ratio == 0.25
    assert all(name.startswith(("tome_", "transformer_blocks", "norm", "proj_")) for name, _ in gm.named_children())


def test_matching_needs_the_tokens_of_the_grid():
    with pytest.raises(ValueError, match="do not form"):
        TokenMatching(0.5, 2, 2, None)(torch.randn(1, 60, 8), torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize(
    "options",
    [{"ratio": 0.8}, {"ratio": -0.1}, {"sublayers": ("attention",)}, {"sublayers": ()}, {"destination": "corner"},
     {"sx": 0}],
)
def test_config_rejects_bad_values(options):
    with pytest.raises(ValueError):
        ToMeConfig(**options)


def test_pass_rejects_a_ratio_above_the_cap(unet):
    with pytest.raises(ValueError, match="outside"):
        insert_token_merging(trace_block(unet.down_blocks[1].attentions[0]), 0.8)


@pytest.mark.parametrize("sx,sy,lowest", [(2, 2, 0.25), (3, 1, 1 / 3), (1, 1, 1.0)])
def test_lowest_keep_is_one_destination_per_cell(sx, sy, lowest):
    config = ToMeConfig(ratio=0.0, sx=sx, sy=sy)
    assert config.lowest_keep == pytest.approx(lowest)
    ToMeConfig(ratio=1 - config.lowest_keep, sx=sx, sy=sy)  # the largest merge ratio is allowed
