r"""The methods ``benchmarks.front`` measures: our own (``atedm_compile.apply``: ToMe, ToDo, AT-EDM
schedules with or without cached steps), the ``DeepCache`` package's helper, and the cache hooks
of ``diffusers.hooks`` that apply to a ``UNet2DConditionModel``.

A method is a name, a family (one curve of the figure), its settings (shown in the table, and with
the family the key of its saved samples: they must say everything that changes its images) and
``enable(pipe)``, a context manager that turns it on and leaves the pipeline exactly as it found it.

diffusers' hooks on a U-Net (diffusers 0.42.1), read from ``diffusers/hooks/*.py`` and run here:
- pyramid attention broadcast applies: it hooks every ``Attention`` whose name contains
  ``transformer_blocks`` (all of a U-Net's); it needs ``current_timestep_callback``, which no
  SD-XL pipeline gives, so ``_TimestepTracker`` reads the timestep off the U-Net's call;
- FasterCache does not: ``apply_faster_cache`` hooks only attention modules whose names match
  its module-level identifiers (``^transformer_blocks.*attn`` and kin, anchored at the model's
  top), whatever identifiers the config gives, so on a U-Net only its denoiser hook goes on (tried
  with ``transformer_blocks.<i>.attn1``). With its unconditional-half skip off
  (``is_guidance_distilled=True``) that hook passes through: images bit-identical, time unchanged;
  with it on, it chunks the 0-dimensional ``timestep`` the SD-XL pipeline passes and fails
  ("chunk expects at least a 1-dimensional tensor");
- TaylorSeer applies with ``cache_identifiers`` of our own (its defaults have the same anchoring):
  it forecasts each transformer layer's output from its last computed steps;
- FirstBlockCache, MagCache and SeaCache do not: they look for a ``ModuleList`` of transformer
  blocks among the model's direct children (``transformer_blocks``, ``blocks``...), and a U-Net
  holds its blocks inside its stages (FirstBlockCache fails on the empty list, MagCache hooks
  nothing and warns, SeaCache raises);
- TextKVCache hooks only ``NucleusMoEImageTransformerBlock``; LayerSkip and smoothed energy
  guidance are guidance tools, not speed-ups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch

import atedm_compile as ac
from atedm_compile.config import DEFAULT_PRUNING, DeepCacheConfig, ToDoConfig, ToMeConfig


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    family: str
    settings: dict
    enable: Callable[[Any], contextlib.AbstractContextManager]


FULL = Method("full model", "full", {}, lambda pipe: contextlib.nullcontext())


# -- ours: atedm_compile.apply -----------------------------------------------------------------

def ours(name: str, preset: str | ac.Schedule, config=None, keep_ratio: float | None = None, cache: DeepCacheConfig | None = None,
         family: str = "ours", **preset_options) -> Method:
    """A method that runs ``atedm_compile.apply(pipe, preset, config, keep_ratio=..., cache=...,
    **preset_options)`` and ``remove`` afterwards. ``preset``: a preset name or a ``Schedule`` (then
    no options); ``config`` None is the package default (``DEFAULT_PRUNING``)."""
    options = dict(preset_options)
    if keep_ratio is not None:
        options["keep_ratio"] = keep_ratio
    if cache is not None:
        options["cache"] = cache
    settings = {"preset": preset if isinstance(preset, str) else repr(preset), "config": repr(config if config is not None else DEFAULT_PRUNING),
                **{k: (repr(v) if isinstance(v, DeepCacheConfig) else v) for k, v in options.items()}}
    # Runs kept from before DeepCacheConfig had a forecast ran its default: their keys stay valid.
    settings = {k: v.replace(", forecast='none'", "") if isinstance(v, str) else v for k, v in settings.items()}

    @contextlib.contextmanager
    def enable(pipe):
        ac.apply(pipe, preset, config, **options)
        try:
            yield
        finally:
            ac.remove(pipe)

    return Method(name, family, settings, enable)


def level_schedule(num_steps: int, level: int, keep_ratio: float) -> ac.Schedule:
    """Every step at ``keep_ratio`` in the blocks of one feature level, the others untouched."""
    return ac.Schedule((ac.Phase("level", 0, num_steps, ((f"level{level}", keep_ratio),)),), num_steps,
                       name=f"level{level}-only")


def tome(ratio: float, num_steps: int, level: int | None = None) -> Method:
    """ToMe (our pass, tomesd's rule) merging ``ratio`` of the tokens at every step, in every block
    (``level`` None) or in the blocks of one level (tomesd's default ``max_downsample=1``: the
    highest-resolution level with attention, level 2 on SD-XL-shaped U-Nets)."""
    config = ToMeConfig(ratio=ratio)
    if level is None:
        method = ours(f"ToMe r={ratio} all", "uniform", config, keep_ratio=round(1 - ratio, 6), family="ToMe")
    else:
        method = ours(f"ToMe r={ratio} L{level}", level_schedule(num_steps, level, round(1 - ratio, 6)), config,
                      family="ToMe")
    return dataclasses.replace(method, settings={"merge_ratio": ratio, "levels": level or "all", **method.settings})


def todo(factor: float, levels: int = 1) -> Method:
    """ToDo (our pass) downsampling keys and values by ``factor`` per side in the self-attentions of
    the ``levels`` highest-resolution attention levels, at every step (keep ratio 1 / factor^2)."""
    config = ToDoConfig(factor=factor, levels=levels)
    method = ours(f"ToDo d={factor:g}" + (f" L{levels}" if levels > 1 else ""), "uniform", config,
                  keep_ratio=1 / factor**2, family="ToDo")
    return dataclasses.replace(method, settings={"factor": factor, "levels": levels, **method.settings})


# -- the DeepCache package ---------------------------------------------------------------------

def deepcache(interval: int, branch: int = 0) -> Method:
    """The ``DeepCache`` package's ``DeepCacheSDHelper`` (uniform spacing)."""

    @contextlib.contextmanager
    def enable(pipe):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        with _no_new_forwards(pipe.unet):
            helper.enable()
            try:
                yield
            finally:
                helper.disable()

    return Method(f"DeepCache i{interval} b{branch}", "DeepCache", {"interval": interval, "branch": branch,
                                                                     "package": "DeepCacheSDHelper"}, enable)


@contextlib.contextmanager
def _no_new_forwards(unet, attributes=("forward",)):
    """Afterwards, delete the instance attributes (``forward``...) a patcher set on ``unet``'s
    modules that were not there before: the helper's ``disable`` puts the original methods back
    as instance attributes, which would then shadow any later patcher's class-level view."""
    before = {name: set(vars(m)) & set(attributes) for name, m in unet.named_modules()}
    try:
        yield
    finally:
        for name, module in unet.named_modules():
            for attr in attributes:
                if attr in vars(module) and attr not in before.get(name, ()):
                    delattr(module, attr)


# -- diffusers' hooks --------------------------------------------------------------------------

class _TimestepTracker:
    """What a diffusers cache hook needs from a pipeline that SD-XL's does not give: the current
    timestep (``current_timestep_callback``), a cache context (the hooks' ``StateManager`` keys its
    state by it) and fresh hook state at the start of each sampling run (a new caption must not
    read the last caption's cache). It watches the U-Net's own calls: one per step, ``num_steps``
    per run."""

    def __init__(self, unet, num_steps: int):
        self.unet, self.num_steps, self.calls, self.timestep = unet, num_steps, 0, None

    def __call__(self, module, args, kwargs):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        step = self.calls % self.num_steps
        self.calls += 1
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        if step == 0:
            registry.reset_stateful_hooks(recurse=True)
        _set_cache_context(self.unet, CacheContext("cond-uncond", step_index=step, num_inference_steps=self.num_steps,
                                                   timestep=self.timestep))


@contextlib.contextmanager
def _diffusers_hooks(pipe, num_steps: int, install: Callable[[torch.nn.Module, Callable[[], float]], None]):
    """Install diffusers hooks on ``pipe.unet`` with ``install(unet, current_timestep)`` and take
    them off afterwards, leaving no registry, no instance ``forward`` and no attribute behind."""
    from diffusers.hooks import HookRegistry

    unet = pipe.unet
    had_registry = {name for name, m in unet.named_modules() if "_diffusers_hook" in vars(m)}
    tracker = _TimestepTracker(unet, num_steps)
    with _no_new_forwards(unet, ("forward", "_diffusers_hook")):
        handle = unet.register_forward_pre_hook(tracker, with_kwargs=True)
        try:
            install(unet, lambda: tracker.timestep)
            HookRegistry.check_if_exists_or_initialize(unet).invalidate_child_registries_cache()
            yield
        finally:
            handle.remove()
            for name, module in reversed(list(unet.named_modules())):
                registry = vars(module).get("_diffusers_hook")
                if registry is not None and name not in had_registry:
                    for hook in list(registry._hook_order)[::-1]:
                        registry.remove_hook(hook, recurse=False)


def pab(spatial: int, cross: int | None = None, timestep_range=(100, 800), num_steps: int = 30) -> Method:
    """diffusers' pyramid attention broadcast: each self-attention (and, with ``cross``, each
    cross-attention) output is computed every ``spatial`` (``cross``) calls and reused between,
    while the timestep is inside ``timestep_range``."""

    def install(unet, current_timestep):
        from diffusers.hooks import (
            PyramidAttentionBroadcastConfig,
            apply_pyramid_attention_broadcast,
        )

        apply_pyramid_attention_broadcast(unet, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=spatial, cross_attention_block_skip_range=cross,
            spatial_attention_timestep_skip_range=tuple(timestep_range),
            cross_attention_timestep_skip_range=tuple(timestep_range), current_timestep_callback=current_timestep))

    settings = {"spatial_skip": spatial, "cross_skip": cross, "timesteps": list(timestep_range), "steps": num_steps}
    name = f"PAB s{spatial}" + (f" c{cross}" if cross else "") + f" t{timestep_range[0]}-{timestep_range[1]}"
    return Method(name, "PAB", settings, lambda pipe: _diffusers_hooks(pipe, num_steps, install))


# TaylorSeer hooks the transformer layers (``BasicTransformerBlock``, which return a tensor): on a
# ``Transformer2DModel`` (which returns a 1-tuple) its forecast comes back as the bare tensor, and
# the caller's ``[0]`` then takes the first image of the batch.
UNET_TRANSFORMER_LAYERS = (r"((down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+",)


def taylorseer(interval: int, order: int = 1, warmup: int = 3, num_steps: int = 30) -> Method:
    """diffusers' TaylorSeer on every transformer layer of the U-Net: computed every
    ``interval`` steps after the first ``warmup``, forecast to ``order`` between."""

    def install(unet, current_timestep):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        apply_taylorseer_cache(unet, TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
            taylor_factors_dtype=torch.float32, cache_identifiers=list(UNET_TRANSFORMER_LAYERS)))

    settings = {"interval": interval, "order": order, "warmup": warmup, "steps": num_steps,
                "blocks": list(UNET_TRANSFORMER_LAYERS)}
    return Method(f"TaylorSeer i{interval} o{order}", "TaylorSeer", settings,
                  lambda pipe: _diffusers_hooks(pipe, num_steps, install))


# -- the default sweep -------------------------------------------------------------------------

def peer_methods(num_steps: int) -> list[Method]:
    """Every peer at several settings of its own (a curve each)."""
    # Sized to the machine: 16 captions x 30 steps x 2 repeats of all of these take about an hour
    # of one core. ToMe and ToDo barely speed this small model up (their points sit near 1x), so
    # they get fewer points than the caches.
    methods = [tome(r, num_steps, level=2) for r in (0.5, 0.7)] + [tome(0.5, num_steps)]
    methods += [todo(f) for f in (1.5, 2, 3)]
    methods += [deepcache(i) for i in (2, 3, 4, 5, 6)] + [deepcache(2, branch=1)]
    methods += [pab(2, num_steps=num_steps), pab(2, 3, (50, 950), num_steps=num_steps),
                pab(4, 6, (0, 1000), num_steps=num_steps)]
    methods += [taylorseer(i, num_steps=num_steps) for i in (2, 3, 5)]
    return methods


def check_unique(methods) -> None:
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods named twice: {duplicates}")
    if any(not re.fullmatch(r"[\w .,=+\-()/]+", n) for n in names):
        raise ValueError(f"method names must be plain text: {names}")
