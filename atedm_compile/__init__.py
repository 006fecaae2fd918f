"""atedm-compile: AT-EDM attention-driven token pruning for diffusers U-Nets, as FX graph passes."""

from .config import DeepCacheConfig, PruningConfig, ToDoConfig, ToMeConfig
from .runner import Runner, apply, remove, runner_of
from .schedule import PRESETS, Phase, Schedule, make_schedule
from .steps import PhaseCall
from .tracing import BlockInfo, attention_blocks, trace_block

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockInfo",
    "DeepCacheConfig",
    "Phase",
    "PhaseCall",
    "PruningConfig",
    "Runner",
    "Schedule",
    "ToDoConfig",
    "ToMeConfig",
    "apply",
    "attention_blocks",
    "make_schedule",
    "remove",
    "runner_of",
    "trace_block",
]
