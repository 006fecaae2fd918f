"""Run a diffusers pipeline (or a bare U-Net) with the phase graphs of a schedule.

``apply`` leaves the U-Net's modules, parameters and state dict as they are: each attention block
gets an instance-level ``forward`` that calls the graph of the phase owning the current step (or
the block's own forward where that phase leaves it unpruned). ``remove`` deletes those attributes
and the original model is back, exactly.

The step index comes from the pipeline's scheduler: ``set_timesteps`` starts a run at step 0 and
every ``scheduler.step`` call ends one step. That is the pipeline's loop index whatever the
scheduler, and with or without CFG (one U-Net call per step either way). A scheduler swapped in
after ``apply`` (``pipe.scheduler = ...``) is followed from the next U-Net call on.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .config import DEFAULT_PRUNING, PruningConfig, ToMeConfig
from .modules import TokenSelector
from .passes import pruning_passes, run_passes
from .schedule import Phase, Schedule, make_schedule
from .steps import PhaseCall, SchedulerFollower, StepCounter
from .tracing import BlockInfo, attention_blocks, trace_block

_RUNNER_ATTR = "_atedm_runner"


@dataclass
class Runner(StepCounter):
    """The state of AT-EDM on one U-Net: the schedule, the phase graphs, the current step.

    Use ``apply`` to make one. With a pipeline the step advances by itself; with a bare U-Net
    call ``start(num_steps)`` and ``set_step(i)`` around your own loop.
    """

    unet: torch.nn.Module = field(repr=False)
    schedule_spec: Schedule | str
    config: PruningConfig | ToMeConfig
    preset_options: dict = field(default_factory=dict)
    blocks: list[BlockInfo] = field(init=False)
    schedule: Schedule | None = field(init=False, default=None)
    step: int = field(init=False, default=0)
    calls: list[PhaseCall] = field(init=False, default_factory=list)

    def __post_init__(self):
        self.blocks = attention_blocks(self.unet)
        self._modules = {b.name: self.unet.get_submodule(b.path) for b in self.blocks}
        self._graphs: dict[tuple[str, float], fx.GraphModule] = {}
        self._capture: dict | None = None
        self._phase_graphs: dict[str, tuple[Phase, dict[str, fx.GraphModule | None]]] = {}
        self._active: dict[str, fx.GraphModule | None] = {b.name: None for b in self.blocks}
        self._phase: Phase | None = None
        self._follower: SchedulerFollower | None = None
        self._hook = None
        self._cudagraph_steps = False
        if not isinstance(self.config, (PruningConfig, ToMeConfig)):
            raise ValueError(f"config={self.config!r} is not a PruningConfig or a ToMeConfig")
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
        # Resolved once per run, so that switching phase inside the sampling loop is a lookup.
        self._phase_graphs = {
            phase.name: (phase, {name: self.graph(name, keep) for name, keep in phase.keep_ratios(self.blocks).items()})
            for phase in schedule.phases
        }
        self.schedule = schedule

    def start(self, num_steps: int) -> None:
        """Begin a sampling run of ``num_steps`` steps at step 0 (``calls`` starts afresh)."""
        self._resolve(num_steps)
        self.calls.clear()
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Make the phase that owns ``step`` the one that runs."""
        if self.schedule is None:
            raise RuntimeError("no sampling run started: call start(num_steps) first")
        self.use_phase(self.schedule.phase_at(step).name)
        self.step = step

    def use_phase(self, name: str | None) -> None:
        """Run every following U-Net call with phase ``name``; ``None`` runs the unpruned model."""
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

    def built_graphs(self) -> dict[tuple[str, float], fx.GraphModule]:
        """Every block graph made so far, by (block name, keep ratio)."""
        return dict(self._graphs)

    def graph(self, block_name: str, keep_ratio: float) -> fx.GraphModule | None:
        """The rewritten graph of a block at a keep ratio (None where nothing is pruned)."""
        if keep_ratio == 1.0:
            return None
        key = (block_name, keep_ratio)
        if key not in self._graphs:
            gm = trace_block(self._modules[block_name], where=block_name)
            self._graphs[key] = run_passes(gm, pruning_passes(keep_ratio, self.config, block_name))
            self._set_capture(self._capture)
        return self._graphs[key]

    def _set_capture(self, captured: dict | None) -> None:
        self._capture = captured
        for gm in self._graphs.values():
            for module in gm.modules():
                if isinstance(module, TokenSelector):
                    module.capture = captured

    @property
    def num_steps(self) -> int | None:
        """Steps of the current sampling run (None before one starts)."""
        return None if self.schedule is None else self.schedule.num_steps

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
        another runner's recompile limit); ``remove`` drops it. Recording kept tokens
        (``capture_kept_tokens``) is a graph of its own per phase. Returns the runner.

        Example:
            >>> runner = apply(pipe, "atedm", keep_ratio=0.37).compile(mode="reduce-overhead")  # doctest: +SKIP
        """
        options = {"fullgraph": True, **options}
        if options["fullgraph"] and getattr(self.config, "scorer", None) == "random":
            raise ValueError("the random scorer draws from a torch.Generator, which a compiled graph cannot "
                             "create: compile(fullgraph=False) lets it run outside the graph")
        # CUDA graphs write every call's output into the same buffers; each U-Net call marks a new
        # step so that they may (the sampling loop has used the previous output by then).
        self._cudagraph_steps = (options.get("mode") in ("reduce-overhead", "max-autotune")
                                 or options.get("backend") == "cudagraphs")
        forward = type(self.unet).forward.__get__(self.unet)
        self.unet.forward = torch.compile(_own_code(lambda *args, **kwargs: forward(*args, **kwargs)), **options)
        return self

    # -- installation ----------------------------------------------------------------------

    def install(self, pipe=None) -> None:
        """Put the phase graphs in the U-Net's blocks (``apply`` does this); given ``pipe``, follow
        its scheduler. After ``uninstall``, installs again as before."""
        for name, module in self._modules.items():
            module.forward = _phased_forward(self, name, module)
        self._hook = self.unet.register_forward_pre_hook(self._before_unet_call, with_kwargs=True)
        if pipe is not None:
            self._follower = self.follow(pipe)
        elif self._follower is not None:  # installed again after uninstall (flops counting does this)
            self._follower.hook()
        object.__setattr__(self.unet, _RUNNER_ATTR, self)

    def uninstall(self) -> None:
        """Give the U-Net (and scheduler) their own behaviour back (``remove`` does this)."""
        for module in self._modules.values():
            module.__dict__.pop("forward", None)
        self.unet.__dict__.pop("forward", None)  # compile()'s
        self._cudagraph_steps = False
        if self._hook is not None:
            self._hook.remove()
        if self._follower is not None:
            self._follower.unhook()
        self.unet.__dict__.pop(_RUNNER_ATTR, None)

    def _before_unet_call(self, unet, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        check_latent(unet, sample)
        if self._follower is not None:
            self._follower.sync()
        if self.schedule is None:
            raise RuntimeError(
                "AT-EDM runner has no current step: sampling must go through the pipeline's scheduler "
                "(apply after setting pipe.scheduler), or call runner.start(num_steps) / set_step(i)"
            )
        self.calls.append(PhaseCall(self.step, self._phase.name if self._phase else "full"))
        if self._cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()


def _own_code(function):
    """A copy of ``function`` with a code object of its own: dynamo keeps compiled graphs per
    code object, so a copy's graphs are its own and go away with it."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


_UNSUPPORTED = ("timestep", "added_cond_kwargs", "class_labels", "attention_mask", "encoder_attention_mask")


def _phased_forward(runner: Runner, name: str, module: torch.nn.Module):
    original = type(module).forward.__get__(module)

    def forward(hidden_states, encoder_hidden_states=None, return_dict=True, **kwargs):
        gm = runner._active[name]
        if gm is None:
            return original(hidden_states, encoder_hidden_states, return_dict=return_dict, **kwargs)
        given = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
        if given or kwargs.get("cross_attention_kwargs"):
            raise ValueError(f"{name}: a pruned block does not take {given or ['cross_attention_kwargs']}")
        (out,) = gm(hidden_states, encoder_hidden_states)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    return forward


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


def _unet_and_scheduler(target):
    if hasattr(target, "unet") and hasattr(target, "scheduler"):
        return target.unet, target.scheduler
    if hasattr(target, "down_blocks"):
        return target, None
    raise ValueError(f"expected a diffusers pipeline with .unet and .scheduler, or a U-Net; got {type(target).__name__}")


def apply(
    target,
    schedule: Schedule | str = "atedm",
    config: PruningConfig | ToMeConfig | None = None,
    **preset_options,
) -> Runner:
    """Prune the attention blocks of a pipeline's (or a bare U-Net's) U-Net with AT-EDM.

    Args:
        target: a diffusers ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline`` (the step
            follows its scheduler), or a ``UNet2DConditionModel`` (drive ``Runner.set_step``).
        schedule: a preset name (built for whatever step count the pipeline is called with) or
            a ``Schedule`` (its step count must match the pipeline's).
        config: scoring, recovery and pruning point. Default ``config.DEFAULT_PRUNING``: the paper's
            G-WPR scores, each 3 x 3 patch's best token kept first, the rest the least like those,
            and the ``delta`` recovery by key cosine; ``PruningConfig()`` is the
            paper's setting (similarity copy). A ``ToMeConfig`` runs the ToMe baseline instead,
            merging ``1 - keep`` of the tokens.
        **preset_options: passed to ``make_schedule`` with a preset name (``keep_ratio``,
            ``prune_less_fraction``, ``prune_less_blocks``...).

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
    unet, scheduler = _unet_and_scheduler(target)
    remove(target)
    if isinstance(schedule, Schedule) and preset_options:
        raise ValueError(f"preset options {sorted(preset_options)} only go with a preset name, not a Schedule")
    runner = Runner(unet, schedule, DEFAULT_PRUNING if config is None else config, preset_options)
    runner.install(target if scheduler is not None else None)
    return runner


def remove(target) -> None:
    """Undo ``apply``: the U-Net and scheduler behave exactly as before. No-op if not applied."""
    unet, _ = _unet_and_scheduler(target)
    runner = unet.__dict__.get(_RUNNER_ATTR)
    if runner is not None:
        runner.uninstall()


def runner_of(target) -> Runner | None:
    unet, _ = _unet_and_scheduler(target)
    return unet.__dict__.get(_RUNNER_ATTR)
