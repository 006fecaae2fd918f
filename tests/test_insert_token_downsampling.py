import pytest
import torch

import atedm_compile as ac
from atedm_compile.config import ToDoConfig, downsample_factor
from atedm_compile.flops import count_phases
from atedm_compile.models import build_unet
from atedm_compile.modules import TokenDownsample
from atedm_compile.passes import pruning_passes
from atedm_compile.passes.insert_token_downsampling import insert_token_downsampling
from atedm_compile.tracing import trace_block


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny")


def _block_inputs(channels=64, size=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=generator), torch.randn(2, 77, 64, generator=generator)


def _downsampled(x, height, width, factor, method):
    """x [B, H * W, C] -> the keys' and values' source [B, h * w, C], written out cell by cell."""
    grid = x.unflatten(1, (height, width))
    if method == "nearest":
        return grid[:, ::factor, ::factor].flatten(1, 2)
    cells = grid.unflatten(1, (height // factor, factor)).unflatten(3, (width // factor, factor))
    return cells.mean(dim=(2, 4)).flatten(1, 2)


def _reference_self_attention(attn, height, width, factor, method):
    """A hand-written multi-head attention whose keys and values come from the downsampled input."""

    def forward(x, encoder_hidden_states=None, attention_mask=None, **_):
        assert encoder_hidden_states is None
        source = _downsampled(x, height, width, factor, method)
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(source), attn.to_v(source)
        q, k, v = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))

    return forward


@pytest.mark.parametrize("factor, method, size", [(2, "nearest", 16), (4, "nearest", 16), (2, "avg", 16),
                                                  (3, "nearest", 12)])
def test_matches_an_eager_attention_with_downsampled_keys_and_values(unet, factor, method, size):
    block = unet.down_blocks[1].attentions[0]
    hidden, context = _block_inputs(size=size)
    gm = insert_token_downsampling(trace_block(block), factor, ToDoConfig(method=method))
    layers = [layer.attn1 for layer in block.transformer_blocks]
    with torch.no_grad():
        plain = block(hidden, context, return_dict=False)[0]
        ours = gm(hidden, context)[0]
        for attn in layers:
            attn.forward = _reference_self_attention(attn, size, size, factor, method)
        try:
            expected = block(hidden, context, return_dict=False)[0]
        finally:
            for attn in layers:
                del attn.forward
    assert (expected - plain).abs().max() > 1e-3  # downsampling changes the output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_every_layer_reads_the_downsampled_keys_and_values(unet):
    gm = insert_token_downsampling(trace_block(unet.down_blocks[1].attentions[0]), 2)
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for layer in (0, 1):
        attn1 = calls[f"transformer_blocks.{layer}.attn1"]
        source = attn1.kwargs["encoder_hidden_states"]
        assert source.target == "todo_downsample"
        assert source.args[0] is attn1.args[0]  # the same norm1 output as the queries
        assert calls[f"transformer_blocks.{layer}.attn2"].kwargs["encoder_hidden_states"].op == "placeholder"


def test_factor_one_is_identity(unet):
    gm = trace_block(unet.down_blocks[1].attentions[0])
    code = gm.code
    assert insert_token_downsampling(gm, 1) is gm
    assert gm.code == code


def test_idempotent(unet):
    gm = insert_token_downsampling(trace_block(unet.down_blocks[1].attentions[0]), 2)
    code = gm.code
    assert insert_token_downsampling(gm, 2).code == code


@pytest.mark.parametrize("keep, factor, side", [(0.25, 2, 8), (1 / 9, 3, 8), (1 / 16, 4, 6)])
def test_keep_ratio_is_the_share_of_keys_and_values_kept(keep, factor, side):
    assert downsample_factor(keep) == pytest.approx(factor)
    assert ToDoConfig(factor=factor).keep_ratio == pytest.approx(keep)
    x = torch.randn(1, (side * factor) ** 2, 4)
    out = TokenDownsample(downsample_factor(keep), "nearest")(x, torch.zeros(1, 1, side * factor, side * factor))
    assert out.shape == (1, side * side, 4)
    assert out.shape[1] / x.shape[1] == pytest.approx(keep)


def test_pruning_passes_run_todo_at_the_keep_ratio(unet):
    (todo_pass,) = pruning_passes(0.25, ToDoConfig(factor=3))
    gm = todo_pass(trace_block(unet.down_blocks[1].attentions[0]))
    assert gm.get_submodule("todo_downsample").factor == pytest.approx(2)


def _unet_inputs(batch=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, 32, 32, generator=generator), "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(batch, 77, 64, generator=generator),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=generator),
                                  "time_ids": torch.randn(batch, 6, generator=generator)}}


@pytest.mark.parametrize("levels, changed", [(1, {2}), (2, {2, 3})])
def test_apply_changes_only_the_configured_levels(unet, levels, changed):
    inputs = _unet_inputs()
    with torch.no_grad():
        plain = unet(**inputs).sample
        runner = ac.apply(unet, ac.make_schedule("uniform", 1, keep_ratio=0.25), ToDoConfig(levels=levels))
        try:
            runner.start(1)
            out = unet(**inputs).sample
        finally:
            ac.remove(unet)
        again = unet(**inputs).sample
    graphs = runner.built_graphs()
    assert {name for name, _ in graphs} == {b.name for b in runner.blocks if b.level in changed}
    assert all(gm.get_submodule("todo_downsample").factor == pytest.approx(2) for gm in graphs.values())
    assert (out - plain).abs().max() > 1e-4
    assert torch.equal(again, plain)


def test_flops_fall_on_the_configured_level_only():
    meta = build_unet("tiny", device="meta")
    schedule = ac.make_schedule("uniform", 1, keep_ratio=0.25)
    report = count_phases(meta, schedule, ToDoConfig(), height=256, width=256)
    (phase,) = report.phases
    assert phase.tmacs < report.full_tmacs
    full = count_phases(meta, ac.make_schedule("none", 1), height=256, width=256, full_flops=report.full_flops)
    full_blocks = {b.name: b.tmacs for b in full.phases[0].blocks}
    levels = {b.name: b.level for b in ac.attention_blocks(meta)}
    for block in phase.blocks:
        if levels[block.name] == 2:
            assert block.tmacs < full_blocks[block.name]
        else:
            assert block.tmacs == full_blocks[block.name]
    assert phase.tmacs_with_scoring == phase.tmacs  # the downsampling is no matrix product


@pytest.mark.parametrize("method", ["nearest", "avg"])
def test_exports_to_onnx_and_runs_in_onnxruntime(unet, tmp_path, method):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    gm = insert_token_downsampling(trace_block(unet.down_blocks[1].attentions[0]), 2, ToDoConfig(method=method))
    hidden, context = _block_inputs()
    path = tmp_path / "todo.onnx"
    torch.onnx.export(gm, (hidden, context), str(path), dynamo=False,
                      input_names=["hidden_states", "encoder_hidden_states"], output_names=["out"])
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"hidden_states": hidden.numpy(), "encoder_hidden_states": context.numpy()})
    with torch.no_grad():
        expected = gm(hidden, context)[0]
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=0, atol=1e-4)


def test_downsample_needs_the_tokens_of_the_grid():
    with pytest.raises(ValueError, match="do not form"):
        TokenDownsample(2, "nearest", "down1.F")(torch.randn(1, 60, 8), torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("options, message", [
    ({"factor": 0.5}, r"factor=0.5 is not allowed: must be a number in \[1, 16\]"),
    ({"factor": 17}, r"factor=17 is not allowed"),
    ({"factor": float("nan")}, r"factor=nan is not allowed"),
    ({"method": "bilinear"}, r"method='bilinear' is not allowed; choose one of \['nearest', 'avg'\]"),
    ({"levels": 0}, r"levels=0 is not allowed: must be an integer"),
    ({"levels": 1.5}, r"levels=1.5 is not allowed: must be an integer"),
])
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        ToDoConfig(**options)


def test_pass_rejects_a_factor_below_one(unet):
    with pytest.raises(ValueError, match=r"factor=0.5 is not allowed"):
        insert_token_downsampling(trace_block(unet.down_blocks[1].attentions[0]), 0.5)
