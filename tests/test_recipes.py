"""The recipes of docs/architecture.md, tried: a toy scorer and a toy recovery, each added by one
entry in its table (``ops.SCORERS``, ``ops.RECOVERIES``), run on the tiny U-Net through
``atedm_compile.apply`` and compared with an eager U-Net whose pruned blocks are written out by hand;
and a toy model, registered in ``models.UNET_CONFIGS`` and ``models.PIPELINES``, counted by
``flops`` and sampled by ``generate``.
"""

import pytest
import torch
from reference import select

import atedm_compile as ac
from atedm_compile import models, ops, roles
from atedm_compile.config import PruningConfig
from atedm_compile.flops import unet_inputs
from atedm_compile.tracing import attention_blocks


def _norm_scores(hidden, settings):
    """The toy scorer: a token's importance is the norm of its hidden state at the pruning point."""
    return hidden.norm(dim=-1)


def _mean_update(inputs):
    """The toy recovery: a pruned token keeps its value at the pruning point and adds the mean update
    the later layers gave the kept tokens."""
    update = (inputs.kept - inputs.kept_before).mean(dim=1, keepdim=True)  # [B, 1, C]
    return ops.scatter_tokens(inputs.before + update, inputs.index, inputs.kept)


@pytest.fixture
def toys(monkeypatch):
    """Registers the toy scorer and recovery, recording every call; the tables are restored after."""
    calls = {"scorer": [], "recovery": []}

    def scorer(hidden, settings):
        calls["scorer"].append((hidden, settings))
        return _norm_scores(hidden, settings)

    def recovery(inputs):
        calls["recovery"].append(inputs)
        return _mean_update(inputs)

    monkeypatch.setitem(ops.SCORERS, "toy-norm", ops.Scorer(scorer, reads="hidden"))
    monkeypatch.setitem(ops.RECOVERIES, "toy-mean-update", ops.Recovery(recovery, reads=("kept_before",)))
    return calls


def _eager_block(block, x, text, k):
    """A Transformer2DModel forward pruned by the toy scorer and recovery, after the first layer's FF,
    written from the diffusers modules alone."""
    batch, channels, height, width = x.shape
    tokens = height * width
    h = block.proj_in(block.norm(x).permute(0, 2, 3, 1).reshape(batch, tokens, channels))
    h = block.transformer_blocks[0](h, encoder_hidden_states=text)
    index = torch.stack([select(h[b].norm(dim=-1), k, height, width) for b in range(batch)])
    kept_before = torch.stack([h[b, index[b]] for b in range(batch)])
    kept = kept_before
    for layer in block.transformer_blocks[1:]:
        kept = layer(kept, encoder_hidden_states=text)
    full = h.clone()
    for b in range(batch):
        update = sum(kept[b, j] - kept_before[b, j] for j in range(k)) / k
        for i in range(tokens):
            full[b, i] = h[b, i] + update
        full[b, index[b]] = kept[b]
    return block.proj_out(full).reshape(batch, height, width, -1).permute(0, 3, 1, 2) + x


def test_a_scorer_and_a_recovery_added_to_the_tables_run_through_apply(tiny_unet, toys):
    config = PruningConfig(scorer="toy-norm", recovery="toy-mean-update")
    inputs = unet_inputs(tiny_unet, 2, 8, 8, device="cpu")
    runner = ac.apply(tiny_unet, "atedm", config)
    try:
        runner.start(10)
        runner.use_phase("pruned")
        with torch.no_grad(), runner.capture_kept_tokens() as kept:
            pruned = tiny_unet(**inputs).sample
    finally:
        ac.remove(tiny_unet)
    assert kept and len(toys["scorer"]) == len(toys["recovery"]) == len(kept)

    # The documented inputs: the scorer the hidden states at the pruning point and its settings; the
    # recovery the kept tokens, their indices, every token at the pruning point, the block input and
    # (as it reads it) the kept tokens there; nothing it did not ask for.
    for (hidden, settings), given, index in zip(toys["scorer"], toys["recovery"], kept.values()):
        batch, tokens, channels = hidden.shape
        k = index.shape[1]
        assert batch == 2 and settings.scorer == "toy-norm" and settings.seed == config.seed
        assert given.kept.shape == given.kept_before.shape == (batch, k, channels)
        assert torch.equal(given.index, index) and torch.equal(given.before, hidden)
        assert given.grid.shape[0] == batch and given.grid.shape[-2] * given.grid.shape[-1] == tokens
        assert given.match is None and given.states == ()
        assert torch.equal(given.kept_before, ops.gather_tokens(hidden, index))

    # The same U-Net with each pruned block written out by hand, at the kept counts the run used.
    paths = {info.name: info.path for info in attention_blocks(tiny_unet)}
    blocks = {name: tiny_unet.get_submodule(paths[name]) for name in kept}
    try:
        for name, block in blocks.items():
            def eager(hidden_states, encoder_hidden_states=None, *args, block=block, k=kept[name].shape[1], **kwargs):
                return (_eager_block(block, hidden_states, encoder_hidden_states, k),)

            block.forward = eager
        with torch.no_grad():
            expected = tiny_unet(**inputs).sample
    finally:
        for block in blocks.values():
            block.__dict__.pop("forward", None)
    torch.testing.assert_close(pruned, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(pruned, tiny_unet(**inputs).sample, atol=1e-3)  # it did prune


def test_a_scorer_reading_a_map_gets_it_exposed(tiny_unet, monkeypatch):
    # reads names the graph value: the pruning passes expose the cross-attention map for it.
    seen = []

    def text_attention(attn, settings):
        seen.append(attn.shape)
        return attn.amax(dim=-1)

    monkeypatch.setitem(ops.SCORERS, "toy-cross", ops.Scorer(text_attention, reads=roles.CROSS_ATTENTION_MAP))
    inputs = unet_inputs(tiny_unet, 2, 8, 8, device="cpu")
    runner = ac.apply(tiny_unet, "atedm", PruningConfig(scorer="toy-cross"))
    try:
        runner.start(10)
        runner.use_phase("pruned")
        with torch.no_grad():
            tiny_unet(**inputs)
    finally:
        ac.remove(tiny_unet)
    text_tokens = inputs["encoder_hidden_states"].shape[1]
    assert seen and all(shape[0] == 2 and shape[2] == text_tokens for shape in seen)


def test_the_config_takes_its_names_from_the_tables(monkeypatch):
    with pytest.raises(ValueError, match="'toy-norm'"):
        PruningConfig(scorer="toy-norm")
    monkeypatch.setitem(ops.SCORERS, "toy-norm", ops.Scorer(_norm_scores, reads="hidden"))
    monkeypatch.setitem(ops.RECOVERIES, "toy-mean-update", ops.Recovery(_mean_update, reads=("kept_before",)))
    config = PruningConfig(scorer="toy-norm", recovery="toy-mean-update")
    assert not config.uses_cross_attention
    with pytest.raises(ValueError, match="only recovery='delta' or recovery='merge-delta' has them"):
        PruningConfig(recovery="toy-mean-update", neighbours=2)


def test_a_table_entry_that_reads_an_unknown_input_is_refused():
    with pytest.raises(ValueError, match="'keys'"):
        ops.Scorer(_norm_scores, reads="keys")
    with pytest.raises(ValueError, match="'grid'"):
        ops.Recovery(_mean_update, reads=("grid",))
    with pytest.raises(ValueError, match="match"):
        ops.Recovery(_mean_update, neighbours=True)


# The toy model: the tiny SD-XL topology at half its width, behind a VAE of three levels (4 px per
# latent cell, not the usual 8): latent 16 -> 64 px.
TOY_UNET = {**models.TINY_SDXL_UNET, "block_out_channels": [16, 32, 64], "transformer_layers_per_block": [1, 1, 1],
            "sample_size": 16}
TOY_VAE = {**models.TINY_VAE, "block_out_channels": [16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
           "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": 64}


def _toy_pipeline(seed: int):
    """The tiny pipeline's text encoders and scheduler around the toy U-Net and VAE, drawn from ``seed``."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    parts = models.tiny_sdxl_pipeline(seed).components
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(**{**parts, "unet": models.build_unet("toy-xl", seed=seed),
                                        "vae": AutoencoderKL.from_config(TOY_VAE).eval(), "add_watermarker": False})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_model_registered_in_the_tables_is_counted_and_sampled(monkeypatch, tmp_path, capsys):
    import json

    from PIL import Image

    from atedm_compile.cli import main

    monkeypatch.setitem(models.UNET_CONFIGS, "toy-xl", TOY_UNET)
    monkeypatch.setitem(models.PIPELINES, "toy-xl", models.BuiltPipeline(_toy_pipeline, TOY_VAE))
    source = models.resolve_model("toy-xl")
    assert source.unet_config() == TOY_UNET and source.vae_factor == 4 and source.has_pipeline
    assert source.identity(1)["name"] == "toy-xl" and source.identity(1)["seed"] == 1

    # flops: its own size by default (16 latent cells x 4 px).
    assert main(["flops", "--model", "toy-xl", "--steps", "4", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert (counted["height"], counted["width"]) == (64, 64) and counted["full_tmacs"] > 0
    assert main(["generate", "--model", "toy-xl", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert "toy-xl: 2 steps at 64x64" in capsys.readouterr().out
    assert Image.open(tmp_path / "image.png").size == (64, 64)
