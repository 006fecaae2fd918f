"""Run a diffusers pipeline (or a bare U-Net) with the phase graphs of a schedule.

``apply`` leaves the U-Net's modules, parameters, state dict and ``forward`` as they are. It adds
a forward pre-hook on the U-Net that finds each call's step (``steps``: from the scheduler of the
pipeline making the call) and picks the phase owning it, and on each attention block an instance
``forward`` that calls the block graph of that phase (``forwards``: plain objects, so a deep copy
or a pickle of an applied U-Net is an independent applied model). ``remove`` puts back exactly what
it found. A phase is "graphs plus the state it keeps between steps", reset at the first call of
every run: with cached steps (``cache=DeepCacheConfig(...)``) the U-Net's ``forward`` runs a full
step (keeping its deep features) or a cached one, whose blocks are the step's phase; the first call
of a run is always full (an img2img may start on a step the rule caches).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .caching import CacheState
from .config import DEFAULT_PRUNING, DeepCacheConfig, PruningConfig, ToDoConfig, ToMeConfig
from .forwards import BeforeUNetCall, CachedUNetForward, CompiledForward, PhasedForward
from .modules import TokenSelector
from .passes import pruning_passes, run_passes
from .schedule import Phase, Schedule, make_schedule
from .steps import PhaseCall, StepTracker
from .tracing import BlockInfo, attention_blocks, trace_block

_RUNNER_ATTR = "_atedm_runner"

@dataclass
class Runner:
    """The state of AT-EDM on one U-Net: the schedule, the phase graphs, the current step.

    Use ``apply`` to make one. Called by a diffusers pipeline, the step comes from that pipeline's
    scheduler (``atedm_compile.steps``); around a loop of your own over a bare U-Net, call
    ``start(num_steps)`` and ``set_step(i)``.
    """

    unet: torch.nn.Module = field(repr=False)
    schedule_spec: Schedule | str
    config: PruningConfig | ToMeConfig | ToDoConfig
    preset_options: dict = field(default_factory=dict)
    blocks: list[BlockInfo] = field(init=False)
    schedule: Schedule | None = field(init=False, default=None)

    def __post_init__(self):
        self.blocks = attention_blocks(self.unet)
        self._modules = {b.name: self.unet.get_submodule(b.path) for b in self.blocks}
        self._graphs: dict[tuple[str, float], fx.GraphModule] = {}
        # The block modules each graph calls, by path: a module swapped in since (a LoRA layer
        # loaded after the first call) makes the graph stale.
        self._leaves: dict[tuple[str, float], list[tuple[str, torch.nn.Module]]] = {}
        self._capture: dict | None = None
        self._phase_graphs: dict[str, tuple[Phase, dict[str, fx.GraphModule | None]]] = {}
        self._active: dict[str, fx.GraphModule | None] = {b.name: None for b in self.blocks}
        self._phase: Phase | None = None
        self._tracker = StepTracker()
        self._hook = None
        self._forwards: dict[str, PhasedForward] = {}
        self._compiled: CompiledForward | None = None
        self._cached: CachedUNetForward | None = None
        self._cache_state = CacheState()
        self._role = "full"
        self._warned: set = set()
        if not isinstance(self.config, (PruningConfig, ToMeConfig, ToDoConfig)):
            raise ValueError(f"config={self.config!r} is not a PruningConfig, a ToMeConfig or a ToDoConfig")
        if isinstance(self.schedule_spec, Schedule):
            self._resolve(self.schedule_spec.num_steps)
        elif not isinstance(self.schedule_spec, str):
            raise ValueError(f"schedule={self.schedule_spec!r} is not a preset name or a Schedule")
        else:
            # Fail now, not at the first sampling call, on a bad preset name or option.
            make_schedule(self.schedule_spec, max(50, self.preset_options.get("prune_less_steps") or 0),
                          **self.preset_options)

    # -- schedule and steps --------------------------------------------------------------

    def _resolve(self, num_steps: int) -> None:
        if isinstance(self.schedule_spec, Schedule):
            self.schedule_spec.check_covers(num_steps)
            schedule = self.schedule_spec
        else:
            schedule = make_schedule(self.schedule_spec, num_steps, **self.preset_options)
        self._drop_stale_graphs()
        # Resolved once per run, so that switching phase inside the sampling loop is a lookup.
        self._phase_graphs = {
            phase.name: (phase, {name: self.graph(name, keep) for name, keep in phase.keep_ratios(self.blocks).items()})
            for phase in schedule.phases
        }
        self.schedule = schedule

    def _drop_stale_graphs(self) -> None:
        stale = [key for key, leaves in self._leaves.items()
                 if any(_submodule(self._modules[key[0]], path) is not module for path, module in leaves)]
        for key in stale:
            del self._graphs[key], self._leaves[key]

    @property
    def cache(self) -> DeepCacheConfig | None:
        """The cached steps' settings of the schedule (None: every step is full)."""
        spec = self.schedule_spec
        return spec.cache if isinstance(spec, Schedule) else self.preset_options.get("cache")

    def start(self, num_steps: int) -> None:
        """Begin a sampling run of ``num_steps`` steps at step 0 (``calls`` starts afresh)."""
        self._resolve(num_steps)
        self._tracker.start(num_steps)
        self._cache_state.reset()
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Make the phase that owns ``step`` (and its role, full or cached) the one that runs."""
        if self.schedule is None:
            raise RuntimeError("no sampling run started: call start(num_steps) first")
        self.use_phase(self.schedule.phase_at(step).name)
        self._role = self.schedule.role_at(step)
        self._tracker.step = step

    @property
    def role(self) -> str:
        """``full`` or ``cached``: how the next U-Net call runs."""
        return self._role

    def use_phase(self, name: str | None) -> None:
        """Run the following U-Net calls made outside a pipeline with phase ``name``, as full
        steps; ``None`` runs the unpruned model. (A pipeline's calls take the phase of their step.)"""
        self._role = "full"
        if name is None:
            self._phase = None
            self._active = dict.fromkeys(self._active)
            return
        if self.schedule is None:
            raise RuntimeError("no sampling run started: call start(num_steps) first")
        if name not in self._phase_graphs:
            raise ValueError(f"unknown phase {name!r}; this schedule has {list(self._phase_graphs)}")
        self._phase, graphs = self._phase_graphs[name]
        self._active = dict(graphs)

    @property
    def phase(self) -> Phase | None:
        return self._phase

    @property
    def step(self) -> int:
        """The step of the current (or last) U-Net call."""
        return self._tracker.step

    @property
    def calls(self) -> list[PhaseCall]:
        """(step, phase) of every U-Net call of the current sampling run."""
        return self._tracker.calls

    @property
    def num_steps(self) -> int | None:
        """Steps of the current sampling run (None before one starts)."""
        return None if self.schedule is None else self.schedule.num_steps

    def built_graphs(self) -> dict[tuple[str, float], fx.GraphModule]:
        """Every block graph made so far, by (block name, keep ratio)."""
        return dict(self._graphs)

    def graph(self, block_name: str, keep_ratio: float) -> fx.GraphModule | None:
        """The rewritten graph of a block at a keep ratio (None where nothing is pruned, or where
        a ``ToDoConfig`` leaves the block's level alone)."""
        if keep_ratio == 1.0 or not self._rewrites(block_name):
            return None
        key = (block_name, keep_ratio)
        if key not in self._graphs:
            block = self._modules[block_name]
            gm = trace_block(block, where=block_name)
            self._graphs[key] = run_passes(gm, pruning_passes(keep_ratio, self.config, block_name))
            self._leaves[key] = [(node.target, gm.get_submodule(node.target)) for node in gm.graph.nodes
                                 if node.op == "call_module" and _submodule(block, node.target) is not None]
            self._set_capture(self._capture)
        return self._graphs[key]

    def _rewrites(self, block_name: str) -> bool:
        if not isinstance(self.config, ToDoConfig):
            return True
        level = next(b.level for b in self.blocks if b.name == block_name)
        return self.config.applies_to(level, [b.level for b in self.blocks])

    def _set_capture(self, captured: dict | None) -> None:
        self._capture = captured
        for gm in self._graphs.values():
            for module in gm.modules():
                if isinstance(module, TokenSelector):
                    module.capture = captured

    @contextlib.contextmanager
    def capture_kept_tokens(self):
        """Record the kept-token indices ([B, k] per pruned block name) of the calls made inside.

        Example:
            >>> with runner.capture_kept_tokens() as kept:  # doctest: +SKIP
            ...     unet(sample, t, encoder_hidden_states=text)
            >>> kept["down1.F"].shape  # doctest: +SKIP
            torch.Size([2, 379])
        """
        captured: dict[str, torch.Tensor] = {}
        self._set_capture(captured)
        try:
            yield captured
        finally:
            self._set_capture(None)

    # -- compiled mode ---------------------------------------------------------------------

    def compile(self, **options) -> Runner:
        """Run every U-Net call through ``torch.compile``: one compiled graph per phase (and one
        for the full model, ``use_phase(None)``), each made at the phase's first call. The graph
        guards on the phase's block graphs, so switching phases afterwards, either way, picks the
        compiled graph of the phase: nothing is compiled again.

        Args:
            **options: for ``torch.compile``: ``mode="reduce-overhead"`` adds CUDA graphs on a
                GPU, ``backend="eager"`` checks the capture without code generation.
                ``fullgraph=True`` unless given: a graph break (a host synchronisation, say) is
                an error, not a silent split.

        The compiled forward is this runner's own (its compiled graphs do not count against
        another runner's recompile limit); ``remove`` puts back the ``forward`` it replaced.
        Recording kept tokens (``capture_kept_tokens``) is a graph of its own per phase. Returns
        the runner.

        Example:
            >>> runner = apply(pipe, "atedm", keep_ratio=0.37).compile(mode="reduce-overhead")  # doctest: +SKIP
        """
        if self.cache is not None:
            raise ValueError("compile() does not take a schedule with cached steps yet: the cached features "
                             "are state kept between calls, outside any graph; apply without cache to compile")
        options = {"fullgraph": True, **options}
        if options["fullgraph"] and getattr(self.config, "scorer", None) == "random":
            raise ValueError("the random scorer draws from a torch.Generator, which a compiled graph cannot "
                             "create: compile(fullgraph=False) lets it run outside the graph")
        if self._compiled is not None:
            self._compiled.uninstall()
        self._compiled = CompiledForward(self.unet, options)
        return self

    # -- installation ----------------------------------------------------------------------

    def install(self) -> None:
        """Put the phase graphs in the U-Net's blocks (``apply`` does this). After ``uninstall``,
        installs again as before."""
        if self.cache is not None:
            self._cached = CachedUNetForward(self)
        for name, module in self._modules.items():
            self._forwards[name] = PhasedForward(self, name, module)
        self._hook = self.unet.register_forward_pre_hook(BeforeUNetCall(self), with_kwargs=True)
        object.__setattr__(self.unet, _RUNNER_ATTR, self)

    def uninstall(self) -> None:
        """Give the U-Net back what it had before ``install`` (``remove`` does this)."""
        for forward in self._forwards.values():
            forward.uninstall()
        self._forwards.clear()
        for wrapper in (self._compiled, self._cached):
            if wrapper is not None:
                wrapper.uninstall()
        self._compiled = self._cached = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.unet.__dict__.pop(_RUNNER_ATTR, None)

    def _before_unet_call(self, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        check_latent(self.unet, sample)
        position, new_run = self._tracker.locate(self.unet, args, kwargs)
        if position is not None:
            if new_run or self.schedule is None or self.schedule.num_steps != position.num_steps:
                self._resolve(position.num_steps)
            if new_run:
                self._cache_state.reset()
            self.set_step(position.step)
        elif self.schedule is None:
            raise RuntimeError(
                "AT-EDM runner has no current step: call the U-Net through a diffusers pipeline (its scheduler "
                "gives the step), or call runner.start(num_steps) / set_step(i) around your own loop")
        if self._role == "cached" and self._cache_state.features is None:
            self._role = "full"  # the first call of a run: no features yet
        self.calls.append(PhaseCall(self.step, self._phase.name if self._phase else "full", self._role))
        if self._compiled is not None and self._compiled.cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()

    @torch.compiler.disable
    def _warn_once(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def __getstate__(self):
        # A copy or a pickle keeps the installation and the settings; its block graphs are made
        # again from its own modules when its first run starts (fx graphs do not unpickle calls
        # of our functions), so it starts with no run, like a runner fresh from apply.
        state = dict(self.__dict__)
        state.update(_graphs={}, _leaves={}, _phase_graphs={}, _active=dict.fromkeys(self._active), _phase=None,
                     schedule=None, _warned=set(), _cache_state=CacheState())
        return state


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def latent_multiple(unet: torch.nn.Module) -> int:
    """Latent height and width must be multiples of this (one halving per down stage but the last)."""
    return 2 ** (len(unet.down_blocks) - 1)


def check_latent(unet: torch.nn.Module, sample: torch.Tensor) -> None:
    """ValueError unless ``sample`` is a [B, in_channels, H, W] latent this U-Net can take."""
    channels = unet.config.in_channels
    multiple = latent_multiple(unet)
    if sample is None or sample.ndim != 4 or sample.shape[1] != channels:
        shape = None if sample is None else tuple(sample.shape)
        raise ValueError(f"latent of shape {shape} is not [batch, {channels}, height, width]")
    height, width = sample.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"latent size {height}x{width} is not a multiple of {multiple} (2 per down stage); "
            f"use an image size that is a multiple of {multiple} x the VAE factor"
        )


def _unet_of(target) -> torch.nn.Module:
    """The U-Net of a pipeline, a U-Net, or a ``torch.compile`` wrapper of either's U-Net."""
    unet = target.unet if hasattr(target, "unet") and hasattr(target, "scheduler") else target
    unet = getattr(unet, "_orig_mod", unet)
    if not hasattr(unet, "down_blocks"):
        raise ValueError(f"expected a diffusers pipeline with .unet and .scheduler, or a U-Net; "
                         f"got {type(target).__name__}")
    return unet


def apply(
    target,
    schedule: Schedule | str = "atedm",
    config: PruningConfig | ToMeConfig | ToDoConfig | None = None,
    **preset_options,
) -> Runner:
    """Prune the attention blocks of a pipeline's (or a bare U-Net's) U-Net with AT-EDM.

    Args:
        target: a diffusers pipeline with a U-Net (``StableDiffusionXLPipeline``,
            ``StableDiffusionPipeline``, their img2img / inpaint / ControlNet / PAG kin), its
            ``UNet2DConditionModel``, or a ``torch.compile`` wrapper of that U-Net. Any pipeline
            that calls this U-Net is followed by its own scheduler (``atedm_compile.steps``);
            outside pipelines, drive ``Runner.start`` / ``Runner.set_step``.
        schedule: a preset name (built for whatever step count the pipeline is called with) or
            a ``Schedule`` (its step count must match the pipeline's). ``atedm``: the paper's DSAP;
            at a FLOPs budget ``atedm-level2`` (level 2 keeps more) is closer to the full model.
        config: scoring, recovery and pruning point. Default ``config.DEFAULT_PRUNING``: the paper's
            G-WPR scores, each 3 x 3 patch's best token kept first, the rest the least like those,
            and the ``merge-delta`` recovery by key cosine; ``PruningConfig()`` is the
            paper's setting (similarity copy). A ``ToMeConfig`` runs the ToMe baseline instead,
            merging ``1 - keep`` of the tokens; a ``ToDoConfig`` runs ToDo, keeping ``keep`` of the
            keys and values of the self-attentions of its levels' blocks.
        **preset_options: passed to ``make_schedule`` with a preset name (``keep_ratio``,
            ``prune_less_fraction``, ``prune_less_blocks``, ``cache=DeepCacheConfig(...)`` for
            DeepCache's cached steps across the phases...).

    Applying again replaces the previous application.

    Example:
        >>> from atedm_compile.models import tiny_sdxl_pipeline
        >>> pipe = tiny_sdxl_pipeline()
        >>> runner = apply(pipe, "atedm", keep_ratio=0.37)
        >>> image = pipe("a red cube", num_inference_steps=4, height=256, width=256).images[0]
        >>> [call.phase for call in runner.calls]
        ['prune-less', 'pruned', 'pruned', 'pruned']
        >>> remove(pipe)
    """
    unet = _unet_of(target)
    remove(unet)
    if isinstance(schedule, Schedule) and preset_options:
        raise ValueError(f"preset options {sorted(preset_options)} only go with a preset name, not a Schedule")
    runner = Runner(unet, schedule, DEFAULT_PRUNING if config is None else config, preset_options)
    runner.install()
    return runner


def remove(target) -> None:
    """Undo ``apply``: the U-Net behaves exactly as before. No-op if not applied."""
    runner = runner_of(target)
    if runner is not None:
        runner.uninstall()


def runner_of(target) -> Runner | None:
    """The runner applied to a pipeline's or U-Net's U-Net (seen through ``torch.compile``), or None."""
    return _unet_of(target).__dict__.get(_RUNNER_ATTR)
