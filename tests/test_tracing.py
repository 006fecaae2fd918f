import pytest
import torch

from atedm_compile.models import build_unet
from atedm_compile.tracing import ROLE, attention_blocks, nodes_with_role, trace_block


def test_names_follow_supplementary_figure(tiny_unet):
    names = [b.name for b in attention_blocks(tiny_unet)]
    assert names == ["down1.F", "down1.L", "down2.F", "down2.L", "mid",
                     "up0.F", "up0.M", "up0.L", "up1.F", "up1.M", "up1.L"]
    levels = {b.name: b.level for b in attention_blocks(tiny_unet)}
    assert levels["down1.F"] == levels["up1.L"] == 2
    assert levels["down2.L"] == levels["mid"] == levels["up0.F"] == 3


def test_sdxl_base_blocks_have_paper_layer_counts():
    blocks = attention_blocks(build_unet("sdxl-base", device="meta"))
    assert {b.name: b.num_layers for b in blocks if b.level == 2} == dict.fromkeys(
        ["down1.F", "down1.L", "up1.F", "up1.M", "up1.L"], 2)
    assert all(b.num_layers == 10 for b in blocks if b.level == 3)


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_traced_blocks_equal_the_original(model):
    unet = build_unet(model)
    for info in attention_blocks(unet):
        block = unet.get_submodule(info.path)
        channels = block.norm.num_channels
        x = torch.randn(2, channels, 8, 8)
        text = torch.randn(2, 77, unet.config.cross_attention_dim)
        (out,) = trace_block(block, info.name)(x, text)
        torch.testing.assert_close(out, block(x, text, return_dict=False)[0], atol=1e-6, rtol=0)


def test_first_layer_is_opened_and_roles_are_marked(level2_block):
    gm = trace_block(level2_block)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1"} <= targets
    assert "transformer_blocks.0" not in targets
    for role in ("self_attention", "cross_attention", "before_ff", "layer_out", "block_input"):
        assert len(nodes_with_role(gm, role)) == 1, role


def test_graph_shares_the_block_parameters(level2_block):
    gm = trace_block(level2_block)
    original = {p.data_ptr() for p in level2_block.parameters()}
    traced = {p.data_ptr() for p in gm.parameters()}
    assert traced and traced <= original
    assert gm.get_submodule("transformer_blocks.1") is level2_block.transformer_blocks[1]


def test_model_without_attention_blocks_is_refused():
    config = {**build_unet("tiny", device="meta").config,
              "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
              "mid_block_type": "UNetMidBlock2D"}
    with pytest.raises(ValueError, match="no attention blocks"):
        attention_blocks(build_unet(dict(config), device="meta"))


def test_not_a_unet_is_refused():
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        attention_blocks(torch.nn.Linear(2, 2))


def test_unsupported_layer_is_named(level2_block):
    layer = level2_block.transformer_blocks[0]
    layer._chunk_size = 4
    try:
        with pytest.raises(NotImplementedError, match="_chunk_size"):
            trace_block(level2_block)
    finally:
        layer._chunk_size = None
    assert ROLE == "atedm_role"
