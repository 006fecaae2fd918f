"""Which sampling step a U-Net call belongs to: shared by the PyTorch runner and the exported U-Net.

Nothing is patched on the scheduler or the pipeline. When a diffusers pipeline calls the U-Net,
the step is read from that pipeline's scheduler at the time of the call: the scheduler's own index
into its full ``timesteps`` (``step_index``, else ``begin_index`` before the first ``step``, else
where the call's timestep stands in ``timesteps``), divided by the scheduler's ``order`` (Heun and
KDPM2 make two U-Net calls per step). That is the step's position in the full N-step schedule,
i.e. its noise level, whatever part of it a pipeline runs:

* img2img / inpaint at strength s run the last s of the N steps: those steps keep their positions
  (a strength-0.3 img2img of 20 steps runs steps 14..19, all in the pruned phase of ``atedm``);
* the SD-XL refiner's ``denoising_start=0.8`` runs the last 20% (all pruned), the base's
  ``denoising_end=0.8`` the first 80%, both by the same positions;
* an interrupted run simply stops; the next one starts from its scheduler's new index.

The pipeline that drives a call is the one on the call stack whose U-Net is the called model, so a
second pipeline sharing the U-Net (``from_pipe``) with its own scheduler, a scheduler swapped in
at any time, and copies of a pipeline are each followed by their own scheduler. Outside any
pipeline (a loop of your own over a bare U-Net), the step is what ``start`` / ``set_step`` set.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass

import torch


@dataclass
class PhaseCall:
    """One U-Net call made under the runner: the step index, the phase that ran and whether the
    step was ``full`` or ``cached`` (a schedule with cached steps)."""

    step: int
    phase: str
    role: str = "full"


@dataclass(frozen=True)
class StepPosition:
    """Where a U-Net call stands in its sampling run: ``step`` of ``num_steps`` (0-based)."""

    step: int
    num_steps: int


def _unwrapped(module):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) stands for, or ``module``."""
    return getattr(module, "_orig_mod", module)


def driving_pipeline(model) -> object | None:
    """The diffusers pipeline on the call stack whose ``unet`` is ``model`` (or a compiled wrapper
    of it), nearest first; None when the call does not come from such a pipeline."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if owner is not None and owner is not model:
            unet = getattr(owner, "__dict__", {}).get("unet")
            if unet is not None and _unwrapped(unet) is model and "scheduler" in owner.__dict__:
                return owner
        frame = frame.f_back
    return None


def _as_float(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


def _index_of(timesteps: torch.Tensor, value: float) -> int | None:
    matches = torch.nonzero(torch.isclose(timesteps.detach().float().cpu(), torch.tensor(value), rtol=1e-5,
                                          atol=1e-4)).flatten()
    return int(matches[0]) if len(matches) else None


def scheduler_position(scheduler, timestep) -> StepPosition:
    """The step of a U-Net call at ``timestep`` made between ``scheduler.set_timesteps`` and the
    ``step`` that consumes it (module docstring); ValueError when the scheduler has no timesteps or
    the timestep is not one of them.

    The scheduler's own index is used where it has one, without reading the timestep (on a GPU
    that would wait for the device); the timestep's value decides only for schedulers without an
    index (DDIM, DDPM) and before a scheduler's first ``step`` when it has no begin index."""
    timesteps = getattr(scheduler, "timesteps", None)
    name = type(scheduler).__name__
    if timesteps is None or len(timesteps) == 0:
        raise ValueError(f"the pipeline's {name} has no timesteps (set_timesteps was never called): the sampling "
                         f"step of this U-Net call cannot be told")
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None)
    if index is None and hasattr(scheduler, "counter"):  # PNDM: step() calls so far
        index = scheduler.counter
    if index is None or not 0 <= index < len(timesteps):
        value = _as_float(timestep)
        index = _index_of(torch.as_tensor(timesteps), value)
        if index is None:
            raise ValueError(f"the U-Net was called at timestep {value:g}, which is not one of the "
                             f"{len(timesteps)} timesteps of the pipeline's {name}: the sampling step cannot be told")
    order = max(1, int(getattr(scheduler, "order", 1) or 1))
    return StepPosition(index // order, math.ceil(len(timesteps) / order))


class StepTracker:
    """The step of the current U-Net call and the record of calls, for the runner and the exported
    U-Net. ``locate`` is called at every U-Net call; ``start`` / ``set_step`` drive calls made
    outside any pipeline."""

    def __init__(self):
        self.step = 0
        self.num_steps: int | None = None
        self.calls: list[PhaseCall] = []
        self._run = None  # the timesteps tensor of the run being followed (weakly)

    def start(self, num_steps: int) -> None:
        self.num_steps, self.step, self._run = num_steps, 0, None
        self.calls.clear()

    def locate(self, model, args: tuple, kwargs: dict) -> tuple[StepPosition | None, bool]:
        """(position, new run) of a call of ``model``: the driving pipeline's scheduler decides;
        without one, ``(None, False)`` and the caller uses ``step`` / ``num_steps`` as set."""
        pipe = driving_pipeline(model)
        if pipe is None:
            return None, False
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is None:
            raise ValueError("the U-Net was called without a timestep")
        scheduler = pipe.scheduler
        position = scheduler_position(scheduler, timestep)
        run = self._run() if self._run is not None else None
        new_run = run is not scheduler.timesteps or (self.calls and position.step < self.calls[-1].step)
        if new_run:
            self._run = weakref.ref(scheduler.timesteps)
            self.calls.clear()
        self.step, self.num_steps = position.step, position.num_steps
        return position, bool(new_run)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_run"] = None  # a weak reference: not copied, not pickled
        return state
