"""U-Nets with random weights from a config, and the tiny pipelines built offline around them
(a byte-level CLIP tokenizer, two 2-layer CLIP text encoders, a 4-level VAE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configs import TINY_SD15_UNET, TINY_SDXL_UNET, TINY_VAE, BuiltPipeline
from .unets import unet_from_config

def tiny_tokenizer(words: Sequence[str] = ()):
    """A real ``CLIPTokenizer`` over a byte-level vocabulary: every byte is a token, with and
    without the end-of-word marker, and each of ``words`` is one token more (BPE merges that
    build it). Any other text still tokenizes, byte by byte. Needs no download.

    Example:
        >>> tokenizer = tiny_tokenizer(["red", "square"])
        >>> tokenizer.tokenize("a red square")
        ['a</w>', 'red</w>', 'square</w>']
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    base = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []

    def build():
        vocab = dict(base)
        for a, b in merges:
            vocab.setdefault(a + b, len(vocab))
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)

    # BPE applies its merges by rank, so one word's merges can split another: add merges that
    # join whatever pieces a word still falls into, until every word is one token.
    tokenizer = build()
    for _ in range(len(words) + 1):
        split = [pieces for pieces in map(tokenizer.tokenize, words) if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            joined = pieces[0]
            for piece in pieces[1:]:
                if (joined, piece) not in merges:
                    merges.append((joined, piece))
                joined += piece
        tokenizer = build()
    raise ValueError(f"could not make single tokens of {[w for w in words if len(tokenizer.tokenize(w)) > 1]}")


def _tiny_text_encoders(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(
        vocab_size=vocab_size,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    # SD-XL concatenates the penultimate hidden states of both encoders: 32 + 32 = 64
    # = TINY_SDXL_UNET["cross_attention_dim"]; encoder 2's projection feeds text_embeds.
    encoder_1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    return encoder_1.eval(), encoder_2.eval()


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete ``StableDiffusionXLPipeline`` with random weights, built offline in about a second.

    U-Net: ``TINY_SDXL_UNET``; VAE: 4 levels of 16 channels (latent 32 -> 256 px); text: two
    2-layer CLIP encoders behind a byte-level CLIP tokenizer.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder, text_encoder_2 = _tiny_text_encoders(len(tokenizer))
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    unet = unet_from_config(TINY_SDXL_UNET, seed=seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` (SD 1.x topology: attention at level 1, conv projections)
    with random weights, built offline. Latent 16x16 -> 128 px."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder, _ = _tiny_text_encoders(len(tokenizer))
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_from_config(TINY_SD15_UNET, seed=seed),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The built-in configs that are also whole pipelines (random weights, built offline), by name:
# ``generate``, ``run`` and ``evaluate`` sample with them. ``vae``: the pipeline's VAE config.
PIPELINES = {"tiny": BuiltPipeline(tiny_sdxl_pipeline, TINY_VAE)}
