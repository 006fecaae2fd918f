"""DeepCache's step caching on a diffusers U-Net: which steps run in full, and the U-Net split
into a full step that also returns the deep features at a skip branch and a cached step that
runs only the shallow layers and takes those features as an input.

The split walks the U-Net's own modules in the order ``UNet2DConditionModel.forward`` calls
them: whole stages through their own ``forward``, and the one stage the branch cuts layer by
layer (resnet, then attention block). Every attention block (``Transformer2DModel``) is called
as a module, so an instance-level ``forward`` on it (the runner's pruned block graphs, another
patcher's) runs as it would inside the plain U-Net.

A branch (``DeepCacheConfig.branch``) names down stage ``block`` and a layer in it: the layers of
that stage before ``layer`` and the up layers numbered ``layer`` down to 0 (up layers are
numbered from the stage's last, as its skip connections pair them with the down layers) are
shallow; the rest of the stage, every deeper stage and the mid block are deep. The cached
feature is what enters up layer ``layer``: the output of the up layer above it, or of the
deeper up stage (after its upsampler), or of the mid block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .config import CACHE_FORECASTS, DeepCacheConfig, check_number

FEATURES_NAME = "deep_features"
_ADDED_INPUTS = ("text_embeds", "time_ids")


# -- which steps run in full ------------------------------------------------------------------


def full_steps(cache: DeepCacheConfig, num_steps: int) -> tuple[int, ...]:
    """The steps of an ``num_steps``-step run that run the whole U-Net (and refresh the cache),
    ascending; every other step is cached. Step 0 is always full.

    Example:
        >>> full_steps(DeepCacheConfig(interval=3), 10)
        (0, 3, 6, 9)
    """
    check_number("num_steps", num_steps, 1, 2**31 - 1, integer=True)
    if cache.interval == 1:
        return tuple(range(num_steps))
    if cache.spacing == "uniform":
        return tuple(range(0, num_steps, cache.interval))
    if cache.center >= num_steps:
        raise ValueError(f"center={cache.center} is not allowed for a {num_steps}-step run: "
                         f"the non-uniform full steps crowd around a step in [0, {num_steps - 1}]")
    return _crowded_around(num_steps, -(-num_steps // cache.interval), cache.center, cache.power)


def _crowded_around(num_steps: int, count: int, center: int, power: float) -> tuple[int, ...]:
    # The package's sample_from_quad_center: ``count`` points evenly spaced in x from
    # -center^(1/p) to (N - center)^(1/p), mapped by x^p and shifted by the center. For center > 0
    # the start is a negative number to a fractional power, which Python makes complex; the points
    # then follow a complex path and the package keeps the real part of x^p (numpy's int cast).
    # That is the rule as it runs, reproduced here (not the real, symmetric curve it suggests).
    while power > 1:
        points = np.linspace((-center) ** (1 / power), (num_steps - center) ** (1 / power), count + 1) ** power
        offsets = np.unique(np.real(points).astype(np.int32))
        # The first point is -center (step 0, written as such); the last, N - center, is past the run.
        steps = [0] + [int(offset) + center for offset in offsets[1:-1]]
        if len(steps) == count:
            return tuple(sorted(set(steps)))
        power -= 0.02  # the package's step: flatter curves until the full steps are distinct
    raise ValueError(f"no non-uniform spacing of {count} full steps in {num_steps} around center={center} "
                     f"with power <= the one given: lower the interval or the center")


# The runner asks at every U-Net call (Schedule.role_at): the rule is solved once per (config, N).
@functools.lru_cache(maxsize=64)
def step_roles(cache: DeepCacheConfig, num_steps: int) -> tuple[str, ...]:
    """``"full"`` or ``"cached"`` for each step of an ``num_steps``-step run.

    Example:
        >>> step_roles(DeepCacheConfig(interval=2), 5)
        ('full', 'cached', 'full', 'cached', 'full')
    """
    full = set(full_steps(cache, num_steps))
    return tuple("full" if step in full else "cached" for step in range(num_steps))


# -- where the U-Net is cut ---------------------------------------------------------------------


@dataclass(frozen=True)
class BranchPosition:
    """block: the down stage the branch cuts (its up stage is ``up_blocks[len - 1 - block]``).
    layer: the first of its down layers that is deep; ``layers_per_block`` is its downsampler."""

    block: int
    layer: int


def branch_position(unet_config, branch: int) -> BranchPosition:
    """Where ``branch`` cuts a U-Net of this config (``unet.config`` or the dict it came from);
    ValueError naming the branches this U-Net has."""
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers!r}: a branch is counted in stages of equal depth, "
                         f"and this U-Net's stages differ")
    stages = len(unet_config["down_block_types"])
    last = stages * (layers + 1) - 1
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= last:
        raise ValueError(f"branch={branch!r} is not allowed: this U-Net's {stages} down stages of {layers} layers "
                         f"and a downsampler give branches 0 to {last}")
    block, layer = divmod(branch, layers + 1)
    return BranchPosition(block, layer)


def features_shape(unet_config, branch: int, batch: int, latent_height: int, latent_width: int) -> tuple:
    """Shape of the cached deep features (what the full step returns and the cached step takes)."""
    position = branch_position(unet_config, branch)
    channels = unet_config["block_out_channels"]
    stages = len(channels)
    # Inside the up stage, its layers' width; at its top (layer = layers_per_block), the width of
    # the deeper up stage, or of the mid block under the deepest stage.
    if position.layer < unet_config["layers_per_block"]:
        width = channels[position.block]
    else:
        width = channels[min(position.block + 1, stages - 1)]
    scale = 2 ** position.block
    return (batch, width, -(-latent_height // scale), -(-latent_width // scale))


# -- the split forward ------------------------------------------------------------------------


def full_forward(unet, branch: int, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole U-Net, as ``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=...)``
    computes it, and the deep features at ``branch`` for the cached steps that follow.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x, or SD-XL with
            ``added_cond_kwargs`` ``text_embeds`` [B, T] and ``time_ids`` [B, 6]).
        sample: [B, C, H, W] latent; encoder_hidden_states: [B, tokens, D]; timestep: a scalar.
    Returns:
        (noise prediction [B, C_out, H, W], features of ``features_shape``).

    Example:
        >>> from atedm_compile.models import build_unet, unet_input_shapes
        >>> unet = build_unet("tiny")
        >>> shapes = unet_input_shapes(unet.config, 2, 32, 32)
        >>> x, text = torch.randn(shapes["sample"]), torch.randn(shapes["encoder_hidden_states"])
        >>> added = {name: torch.randn(shapes[name]) for name in ("text_embeds", "time_ids")}
        >>> noise, features = full_forward(unet, 0, x, 999.0, text, added)
        >>> noise_cached = cached_forward(unet, 0, features, x, 979.0, text, added)
        >>> tuple(features.shape), tuple(noise_cached.shape)
        ((2, 32, 32, 32), (2, 4, 32, 32))
    """
    return _forward(unet, branch, sample, timestep, encoder_hidden_states, added_cond_kwargs, None)


def cached_forward(unet, branch: int, features: torch.Tensor, sample: torch.Tensor, timestep,
                   encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """The shallow layers at ``branch`` only, with ``features`` (from ``full_forward`` at the same
    branch, batch and size) in place of the deep part. Arguments as ``full_forward``'s."""
    if features is None:
        raise ValueError("a cached step needs the deep features of a full step: run full_forward first")
    return _forward(unet, branch, sample, timestep, encoder_hidden_states, added_cond_kwargs, features)[0]


def _forward(unet, branch, sample, timestep, text, added, features):
    position = branch_position(unet.config, branch)
    cut_down, cut_up = _cut_stages(unet, position)
    stages = len(unet.down_blocks)
    if features is not None:
        expected = features_shape(unet.config, branch, sample.shape[0], *sample.shape[-2:])
        if tuple(features.shape) != expected:
            raise ValueError(f"features of shape {tuple(features.shape)} do not fit branch {branch} at this latent: "
                             f"expected {expected}")
    # As UNet2DConditionModel.forward: sizes that do not halve evenly are passed to the upsamplers.
    uneven = any(size % 2**unet.num_upsamplers for size in sample.shape[-2:])
    hidden, emb, text = _embed(unet, sample, timestep, text, added)

    skips = (hidden,)
    for stage in unet.down_blocks[:position.block]:
        hidden, states = _down_stage(stage, hidden, emb, text)
        skips += states
    hidden, states = _down_layers(cut_down, hidden, emb, text, range(position.layer))
    skips += states
    if features is None:
        hidden, states = _down_layers(cut_down, hidden, emb, text, range(position.layer, _down_layer_count(cut_down)))
        skips += states
        for stage in unet.down_blocks[position.block + 1:]:
            hidden, states = _down_stage(stage, hidden, emb, text)
            skips += states
        if unet.mid_block is not None:
            hidden = _mid(unet.mid_block, hidden, emb, text)
        for stage in unet.up_blocks[:stages - 1 - position.block]:
            taken, skips = skips[-len(stage.resnets):], skips[:-len(stage.resnets)]
            hidden = _up_stage(stage, hidden, taken, emb, text, _upsample_size(uneven, skips))
        taken, skips = skips[-len(cut_up.resnets):], skips[:-len(cut_up.resnets)]
        deep_resnets = len(cut_up.resnets) - 1 - position.layer
        hidden, taken = _up_layers(cut_up, hidden, taken, emb, text, range(deep_resnets))
        features = hidden
    else:
        taken, skips = skips[-(position.layer + 1):], skips[:-(position.layer + 1)]
        hidden = features
    hidden, _ = _up_layers(cut_up, hidden, taken, emb, text, range(len(cut_up.resnets) - 1 - position.layer,
                                                                   len(cut_up.resnets)))
    if cut_up.upsamplers is not None:
        size = _upsample_size(uneven and position.block > 0, skips)
        for upsampler in cut_up.upsamplers:
            hidden = upsampler(hidden, size)
    for stage in unet.up_blocks[stages - position.block:]:
        taken, skips = skips[-len(stage.resnets):], skips[:-len(stage.resnets)]
        final = stage is unet.up_blocks[-1]
        hidden = _up_stage(stage, hidden, taken, emb, text, None if final else _upsample_size(uneven, skips))
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden), features


def _cut_stages(unet, position: BranchPosition):
    from diffusers.models.unets.unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                                       UpBlock2D)

    down = unet.down_blocks[position.block]
    up = unet.up_blocks[len(unet.up_blocks) - 1 - position.block]
    if not isinstance(down, (CrossAttnDownBlock2D, DownBlock2D)) or not isinstance(up, (CrossAttnUpBlock2D, UpBlock2D)):
        raise ValueError(f"cannot cut {type(down).__name__} / {type(up).__name__} layer by layer: a branch must "
                         f"fall in a (CrossAttn)DownBlock2D stage and its (CrossAttn)UpBlock2D")
    if len(up.resnets) != len(down.resnets) + 1:
        raise ValueError(f"up stage of {len(up.resnets)} layers does not mirror its down stage of "
                         f"{len(down.resnets)} (+1): the skip connections do not pair up")
    if all(getattr(up, name, None) for name in ("s1", "s2", "b1", "b2")):
        raise ValueError("FreeU is enabled on the up stage the branch cuts: disable_freeu() first")
    return down, up


def _embed(unet, sample, timestep, text, added):
    if getattr(unet, "class_embedding", None) is not None or unet.config.addition_embed_type == "image_hint":
        raise ValueError("class labels and image hints are not inputs of the split U-Net")
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added)
    return unet.conv_in(sample), emb, text


def _down_stage(stage, hidden, emb, text):
    if getattr(stage, "has_cross_attention", False):
        return stage(hidden_states=hidden, temb=emb, encoder_hidden_states=text)
    return stage(hidden_states=hidden, temb=emb)


def _mid(mid, hidden, emb, text):
    if getattr(mid, "has_cross_attention", False):
        return mid(hidden, emb, encoder_hidden_states=text)
    return mid(hidden, emb)


def _up_stage(stage, hidden, skips, emb, text, upsample_size):
    if getattr(stage, "has_cross_attention", False):
        return stage(hidden_states=hidden, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=text,
                     upsample_size=upsample_size)
    return stage(hidden_states=hidden, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)


def _upsample_size(uneven: bool, skips):
    return skips[-1].shape[2:] if uneven else None


def _down_layer_count(stage) -> int:
    return len(stage.resnets) + (stage.downsamplers is not None)


def _attend(stage, index, hidden, text):
    attentions = getattr(stage, "attentions", None)
    if attentions is None:
        return hidden
    return attentions[index](hidden, encoder_hidden_states=text, return_dict=False)[0]


def _down_layers(stage, hidden, emb, text, layers: range):
    """Down layers ``layers`` of a stage (index ``len(resnets)``: the downsampler) -> (hidden, skips)."""
    states = ()
    for layer in layers:
        if layer < len(stage.resnets):
            hidden = _attend(stage, layer, stage.resnets[layer](hidden, emb), text)
        else:
            for downsampler in stage.downsamplers:
                hidden = downsampler(hidden)
        states += (hidden,)
    return hidden, states


def _up_layers(stage, hidden, skips, emb, text, resnets: range):
    """Resnets ``resnets`` (module order) of an up stage, each with the last of ``skips`` ->
    (hidden, the skips left)."""
    for index in resnets:
        hidden = torch.cat([hidden, skips[-1]], dim=1)
        skips = skips[:-1]
        hidden = _attend(stage, index, stage.resnets[index](hidden, emb), text)
    return hidden, skips


# -- phases: graphs with explicit tensor inputs and outputs, and the state between steps --------


class _StepSignature(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, branch: int, input_names):
        super().__init__()
        branch_position(unet.config, branch)
        self.unet = unet
        self.branch = branch
        self.input_names = list(input_names)

    def _named(self, tensors):
        if len(tensors) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}")
        named = dict(zip(self.input_names, tensors))
        added = {name: named.pop(name) for name in _ADDED_INPUTS if name in named}
        return named, added or None


class FullStep(_StepSignature):
    """The full step as a graph: named positional inputs (``sample``, ``timestep``,
    ``encoder_hidden_states``, SD-XL's ``text_embeds``, ``time_ids``) -> (latent, deep features)."""

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named, added = self._named(tensors)
        return full_forward(self.unet, self.branch, named["sample"], named["timestep"],
                            named["encoder_hidden_states"], added)


class CachedStep(_StepSignature):
    """The cached step as a graph: the same named inputs plus ``deep_features`` -> latent."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        named, added = self._named(tensors)
        return cached_forward(self.unet, self.branch, named[FEATURES_NAME], named["sample"], named["timestep"],
                              named["encoder_hidden_states"], added)


@dataclass
class CacheState:
    """What a run with cached steps keeps between U-Net calls: the deep features of the last full
    step and the timestep it ran at, and the one before (for ``forecast="linear"``). ``reset`` at
    the start of every run (a cached step never reads another run's)."""

    features: torch.Tensor | None = None
    timestep: object = None  # as the pipeline passed it: read as a number only to forecast
    previous: tuple[object, torch.Tensor] | None = None

    def reset(self) -> None:
        self.features = self.timestep = self.previous = None

    def keep(self, timestep, features: torch.Tensor) -> None:
        """A full step's features, at its timestep."""
        if self.features is not None:
            self.previous = (self.timestep, self.features)
        self.features, self.timestep = features, timestep

    def read(self, timestep, forecast: str = "none") -> torch.Tensor:
        """The features a cached step at ``timestep`` runs on: the last full step's (``none``, or
        after a single full step), or their line through the two last full steps read at
        ``timestep`` (``linear``)."""
        if self.features is None:
            raise RuntimeError("a cached step came before any full step of this run: step 0 must be full")
        if forecast not in CACHE_FORECASTS:
            raise ValueError(f"forecast={forecast!r} is not allowed; choose one of {list(CACHE_FORECASTS)}")
        if forecast == "none" or self.previous is None:
            return self.features
        # A timestep on the GPU is read back here only: runs without a forecast never wait on it.
        (before, earlier), last, now = self.previous, _timestep_value(self.timestep), _timestep_value(timestep)
        before = _timestep_value(before)
        if before == last:  # two calls at one timestep (a second-order solver's): no slope
            return self.features
        return self.features + (now - last) * ((self.features - earlier) / (last - before))


def _timestep_value(timestep) -> float:
    # Pipelines pass a scalar, a 0-d tensor or one per image (all equal).
    return float(torch.as_tensor(timestep).flatten()[0])


def cached_step(unet, branch: int, full: bool, state: CacheState, sample: torch.Tensor, timestep,
                encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None,
                forecast: str = "none") -> torch.Tensor:
    """One U-Net call of a run with cached steps: ``full`` (from ``step_roles``) runs
    ``full_forward`` and keeps its features in ``state``; otherwise ``cached_forward`` reads them
    (``forecast``: ``DeepCacheConfig.forecast``)."""
    if full:
        noise, features = full_forward(unet, branch, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        state.keep(timestep, features)
        return noise
    return cached_forward(unet, branch, state.read(timestep, forecast), sample, timestep, encoder_hidden_states,
                          added_cond_kwargs)
