"""The paper's evaluation on your own weights: FID (clean-fid) and CLIP score (OpenCLIP ViT-g-14)
of each method at matched FLOPs budgets and guidance scales, sharded over ``torchrun`` ranks.

``atedm-compile evaluate`` on the command line; ``evaluate(EvaluateConfig(...), metrics)`` in Python.
"""

from .captions import Caption, read_captions
from .metrics import Metrics, MissingMetricDependency, load_metrics, paper_metrics
from .plan import METHODS, plan_budgets
from .run import EvaluateConfig, evaluate

__all__ = [
    "METHODS",
    "Caption",
    "EvaluateConfig",
    "Metrics",
    "MissingMetricDependency",
    "evaluate",
    "load_metrics",
    "paper_metrics",
    "plan_budgets",
    "read_captions",
]
