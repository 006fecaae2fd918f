"""Step tracking shared by the PyTorch runner and the exported U-Net.

Both know the sampling step by following a diffusers pipeline's scheduler: ``set_timesteps``
starts a run at step 0 and every ``scheduler.step`` call ends one step. That is the pipeline's
loop index whatever the scheduler, and with or without CFG (one U-Net call per step either way).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass


@dataclass
class PhaseCall:
    """One U-Net call made under the runner: the step index and the phase that ran."""

    step: int
    phase: str


class StepCounter:
    """The step of a sampling run, for a class with ``step``, ``num_steps`` (None before a run),
    ``start(num_steps)`` and ``set_step(step)``: ``advance`` moves to the next step (and stays on
    the last one), ``follow`` hooks it to a pipeline's scheduler."""

    step: int
    num_steps: int | None

    def advance(self) -> None:
        """Go to the next step of the run (no-op on its last step or before a run)."""
        if self.num_steps is not None and self.step + 1 < self.num_steps:
            self.set_step(self.step + 1)

    def follow(self, pipe) -> SchedulerFollower:
        """Follow ``pipe``'s scheduler (also one swapped in later): ``start``, ``advance``, ``set_step``."""
        return SchedulerFollower(pipe, self.start, self.advance, self.set_step)


def follow_scheduler(scheduler, start, advance) -> None:
    """Hook a diffusers scheduler instance: after ``set_timesteps``, ``start(len(timesteps))``;
    after each ``step``, ``advance()``. That is the pipeline's loop index, whatever the scheduler."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    def hooked_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        start(len(scheduler.timesteps))
        return out

    def hooked_step(*args, **kwargs):
        out = step(*args, **kwargs)
        advance()
        return out

    scheduler.set_timesteps, scheduler.step = hooked_set_timesteps, hooked_step


def unfollow_scheduler(scheduler) -> None:
    """Undo ``follow_scheduler``: the instance's class methods are visible again."""
    scheduler.__dict__.pop("set_timesteps", None)
    scheduler.__dict__.pop("step", None)


class SchedulerFollower:
    """Keeps ``start`` / ``advance`` hooked (``follow_scheduler``) on the scheduler a pipeline
    actually calls. Diffusers users often swap schedulers (``pipe.scheduler = X.from_config(...)``)
    after ``apply``; ``sync``, called before every U-Net call, moves the hooks to the new one and
    picks up the run its ``set_timesteps`` (which ran unhooked) set up."""

    def __init__(self, pipe, start, advance, set_step):
        self._pipe = weakref.ref(pipe)
        self._start, self._advance, self._set_step = start, advance, set_step
        self.scheduler = None
        self.hook()

    def hook(self) -> None:
        """Follow the pipeline's current scheduler (and no other)."""
        self.unhook()
        pipe = self._pipe()
        if pipe is not None:
            self.scheduler = pipe.scheduler
            follow_scheduler(self.scheduler, self._start, self._advance)

    def sync(self) -> None:
        """If the pipeline's scheduler was replaced, follow the new one from the step it is at."""
        pipe = self._pipe()
        if pipe is None or pipe.scheduler is self.scheduler:
            return
        self.hook()
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        if timesteps is None:
            raise RuntimeError(
                f"pipe.scheduler was replaced by a {type(pipe.scheduler).__name__} whose set_timesteps was never "
                f"called: the step cannot be told; call set_timesteps first, or apply again")
        self._start(len(timesteps))
        # step_index: how many step() calls this run has made (None before the first one).
        step = getattr(pipe.scheduler, "step_index", None)
        if step:
            self._set_step(int(step))

    def unhook(self) -> None:
        if self.scheduler is not None:
            unfollow_scheduler(self.scheduler)
            self.scheduler = None
