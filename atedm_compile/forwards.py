"""The objects the runner puts on a U-Net: instance-level ``forward``s and the pre-hook.

Each is a plain object (no closure), so a deep copy or a pickle of the U-Net copies it along
with the runner it points at. An instance ``forward`` records what it replaced (another
wrapper's forward, or none) and puts exactly that back; its signature is the replaced one's.
"""

from __future__ import annotations

import inspect
import types
import warnings

import torch

from .caching import cached_step

# Attention processors whose result is plain softmax attention of to_q / to_k / to_v: the map path
# of a pruned block's first layer computes exactly that. Any other processor on that layer (PAG's,
# a user's own) is honoured by leaving the block unpruned for the call, with one warning.
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "SlicedAttnProcessor",
                    "XFormersAttnProcessor", "AttnProcessorNPU")
# Block arguments the block graphs do not take; a call that gives one runs the block unpruned.
_NOT_IN_BLOCK_GRAPHS = ("timestep", "added_cond_kwargs", "class_labels", "cross_attention_kwargs", "attention_mask",
                        "encoder_attention_mask")
# UNet2DConditionModel.forward's arguments that a cached step's split of the U-Net does not take.
_NOT_SPLIT = ("class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
              "down_block_additional_residuals", "mid_block_additional_residual",
              "down_intrablock_additional_residuals", "encoder_attention_mask")


class InstanceForward:
    """Base: becomes ``module.forward`` (an instance attribute) until ``uninstall``."""

    what = "an instance forward"  # for the warning when it cannot come off
    what_stays = "it stays under that wrapper"

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.replaced = module.__dict__.get("forward")  # an instance forward of someone else's, if any
        # The names of positional arguments, as the module's class forward takes them.
        self.parameter_names = tuple(inspect.signature(type(module).forward).parameters)[1:]
        module.__dict__["forward"] = self

    @property
    def replaced_plain(self) -> bool:
        """Whether what was replaced behaves as the class forward: nothing, or a bound class forward
        that a removed hook left behind (accelerate and DeepCache do)."""
        replaced = self.replaced
        return replaced is None or (isinstance(replaced, types.MethodType) and replaced.__self__ is self.module
                                    and replaced.__func__ is type(self.module).forward)

    @property
    def previous(self):
        """The forward this one replaced, as a callable."""
        return self.replaced if self.replaced is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.previous)

    def arguments(self, args: tuple, kwargs: dict) -> dict:
        return dict(zip(self.parameter_names, args), **kwargs)

    def uninstall(self) -> bool:
        """Put back what was replaced. False, with a warning, and nothing changed when another
        wrapper was put over this one since (this one stays under it)."""
        if self.module.__dict__.get("forward") is not self:
            wrapper = type(self.module.__dict__.get("forward")).__name__
            warnings.warn(f"AT-EDM: {self.what} was wrapped by {wrapper} after apply; {self.what_stays}",
                          stacklevel=4)
            return False
        if self.replaced is None:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.replaced
        return True


class PhasedForward(InstanceForward):
    """An attention block's ``forward`` under the runner: the current phase's graph for the block,
    or the forward it replaced where the phase leaves the block unpruned."""

    def __init__(self, runner, name: str, module: torch.nn.Module):
        self.runner, self.name, self.active = runner, name, True
        super().__init__(module)

    def __call__(self, *args, **kwargs):
        gm = self.runner._active[self.name] if self.active else None
        if gm is None:
            return self.previous(*args, **kwargs)
        arguments = self.arguments(args, kwargs)
        given = [k for k in _NOT_IN_BLOCK_GRAPHS if arguments.get(k) is not None]
        processor = type(self.module.transformer_blocks[0].attn1.processor).__name__
        if given or processor not in PLAIN_PROCESSORS:
            reason = (f"it was given {given}" if given else
                      f"its first layer's self-attention runs {processor}, whose result the pruning map path "
                      f"does not reproduce")
            self.runner._warn_once((self.name, tuple(given), processor),
                                   f"AT-EDM: block {self.name} runs unpruned because {reason}")
            return self.previous(*args, **kwargs)
        (out,) = gm(arguments["hidden_states"], arguments.get("encoder_hidden_states"))
        if arguments.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)

    @property
    def what(self) -> str:
        return f"the forward of block {self.name}"

    what_stays = "AT-EDM is off in it, but its pass-through stays under that wrapper until the wrapper is removed"

    def uninstall(self) -> bool:
        self.active = False
        return super().uninstall()


class BeforeUNetCall:
    """The U-Net's forward pre-hook: the phase of the call, from its step. Runs outside any
    compiled region (it reads the scheduler, plain Python state)."""

    def __init__(self, runner):
        self.runner = runner

    @torch.compiler.disable
    def __call__(self, unet, args, kwargs):
        self.runner._before_unet_call(args, kwargs)


class CompiledForward(InstanceForward):
    """``Runner.compile``'s U-Net ``forward``: ``torch.compile`` of the forward it replaced, made at
    the first call (and again in a copy: compiled code is not copied or pickled)."""

    def __init__(self, unet: torch.nn.Module, options: dict):
        self.options = options
        # CUDA graphs write every call's output into the same buffers; each U-Net call marks a new
        # step so that they may (the sampling loop has used the previous output by then).
        self.cudagraph_steps = (options.get("mode") in ("reduce-overhead", "max-autotune")
                                or options.get("backend") == "cudagraphs")
        self._compiled = None
        super().__init__(unet)

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            forward = self.previous
            self._compiled = torch.compile(_own_code(lambda *a, **k: forward(*a, **k)), **self.options)
        return self._compiled(*args, **kwargs)

    what = "the U-Net's compiled forward"

    def __getstate__(self):
        return {**self.__dict__, "_compiled": None}


class CachedUNetForward(InstanceForward):
    """The U-Net's ``forward`` under a schedule with cached steps: ``caching.cached_step`` in the
    role the pre-hook chose (full: the whole U-Net, keeping its deep features; cached: the shallow
    layers on them). The attention blocks it calls run the step's phase."""

    def __init__(self, runner):
        self.runner = runner
        super().__init__(runner.unet)
        if not self.replaced_plain:
            super().uninstall()
            raise ValueError(f"cached steps replace the U-Net's forward, which is already replaced by "
                             f"{type(self.replaced).__name__} (an offload hook or a compiled forward): apply "
                             f"before adding it")

    def __call__(self, *args, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        arguments = self.arguments(args, kwargs)
        given = [name for name in _NOT_SPLIT if arguments.get(name) is not None]
        if given:
            raise ValueError(f"a schedule with cached steps does not take {given} (ControlNet residuals, class "
                             f"labels, masks...): apply without cache for this pipeline")
        runner = self.runner
        noise = cached_step(self.module, runner.cache.branch, runner.role == "full", runner._cache_state,
                            arguments["sample"], arguments["timestep"], arguments["encoder_hidden_states"],
                            arguments.get("added_cond_kwargs"), runner.cache.forecast)
        return UNet2DConditionOutput(sample=noise) if arguments.get("return_dict", True) else (noise,)

    what = "the U-Net's cached-step forward"


def _own_code(function):
    """A copy of ``function`` with a code object of its own: dynamo keeps compiled graphs per
    code object, so a copy's graphs are its own and go away with it."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
