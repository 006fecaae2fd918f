"""Graph passes, one per file. Each is ``GraphModule -> GraphModule`` and ends in
``tracing.finalize`` (dead-code elimination, lint, recompile).

The order is explicit: ``pruning_passes`` lists what ``apply`` runs for a block.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.fx as fx

from ..config import DEFAULT_PRUNING, PruningConfig, ToDoConfig, ToMeConfig, downsample_factor
from .expose_attention_map import expose_attention_map
from .insert_token_downsampling import insert_token_downsampling
from .insert_token_pruning import insert_token_pruning
from .insert_token_merging import insert_token_merging
from .insert_token_recovery import insert_token_recovery

Pass = Callable[[fx.GraphModule], fx.GraphModule]

__all__ = [
    "Pass",
    "ToDoConfig",
    "ToMeConfig",
    "expose_attention_map",
    "insert_token_downsampling",
    "insert_token_merging",
    "insert_token_pruning",
    "insert_token_recovery",
    "pruning_passes",
    "run_passes",
]


def pruning_passes(
    keep_ratio: float, config: PruningConfig | ToMeConfig | ToDoConfig = DEFAULT_PRUNING, block_name: str = ""
) -> list[Pass]:
    """The ordered passes that prune one block at ``keep_ratio`` as ``config`` says (default
    ``DEFAULT_PRUNING``, what ``apply`` runs; ``PAPER_PRUNING`` is the paper's AT-EDM).

    With a ``ToMeConfig`` the block merges instead (the ToMe baseline) at merge ratio
    ``1 - keep_ratio``, so that schedules and budgets serve both methods alike; with a
    ``ToDoConfig`` its self-attentions keep ``keep_ratio`` of the keys and values (factor
    ``1 / sqrt(keep_ratio)``).
    """
    if isinstance(config, ToDoConfig):
        return [partial(insert_token_downsampling, factor=downsample_factor(keep_ratio), config=config,
                        block_name=block_name)]
    if isinstance(config, ToMeConfig):
        return [partial(insert_token_merging, ratio=1.0 - keep_ratio, config=config, block_name=block_name)]
    reduction = config.head_reduction
    passes: list[Pass] = [partial(expose_attention_map, which="self", head_reduction=reduction)]
    if config.uses_cross_attention:
        passes.append(partial(expose_attention_map, which="cross", head_reduction=reduction))
    passes.append(partial(insert_token_pruning, keep_ratio=keep_ratio, config=config, block_name=block_name))
    passes.append(partial(insert_token_recovery, config=config))
    return passes


def run_passes(gm: fx.GraphModule, passes: list[Pass]) -> fx.GraphModule:
    for apply_pass in passes:
        gm = apply_pass(gm)
    return gm
