"""What an evaluation is asked to do (``EvaluateConfig``, checked before anything runs) and the
runs it makes: a method at a budget and a guidance scale (``Run``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from ..arguments import check_output
from ..config import MAX_GUIDANCE, MAX_STEPS, check_keep_ratio
from ..devices import DTYPE_ALIASES, DTYPES, resolve_dtype
from .plan import METHODS


IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # clean-fid's, less .npy


@dataclass
class EvaluateConfig:
    """Args:
    model: ``tiny-shapes`` (shipped), ``tiny`` or a diffusers pipeline folder / hub id in the cache.
    captions: a text file (one caption per line) or COCO ``captions_val2017.json``.
    out: the output folder; a rerun with the same settings resumes in it.
    methods: names in ``METHODS``: ``full``, ``atedm`` (the paper's), ``default`` (the package's
        ``DEFAULT_PRUNING`` on the ``atedm-level2`` schedule), ``atedm-dagger``, ``tome``, ``random``.
    budgets: TMACs of AT-EDM's all-pruned phase per U-Net call on the CFG pair (the paper's
        labels: 4.1 is keep 0.37 on SD-XL 1024 px); keep_ratios: budgets given as AT-EDM's keep ratio.
    guidance: CFG scales; images: the first N captions (default all); steps: sampling steps.
    seed: caption i is sampled from seed + i, for every method.
    batch: images per chunk (generated together); part of the settings a rerun must keep.
    height, width: default ``sizes.sampling_size``'s rule: the model's own size; width = height where only
        the height is given.
    reference: a folder of real images (COCO val2017): center-cropped and resized to the
        generated size (supp. A.4), then clean-fid's own resize; or reference_stats: an ``.npz``
        with ``mu`` and ``sigma`` (clean-fid's statistics format; ``reference.npz`` of an earlier run).
    device: ``auto`` (this rank's GPU, else CPU), ``cpu``, ``cuda``; dtype: ``auto`` (fp16
        on GPU, else fp32), ``fp32``, ``fp16``, ``bf16`` (as ``generate`` names them; ``float16``
        and the other torch names are taken too).
    budget_tolerance: of the keep ratios solved for budgets.
    """

    model: str
    captions: str | Path
    out: str | Path
    methods: Sequence[str] = ("full", "atedm", "default", "tome")
    budgets: Sequence[float] = ()
    keep_ratios: Sequence[float] = ()
    guidance: Sequence[float] = (7.0,)
    images: int | None = None
    steps: int = 50
    seed: int = 0
    batch: int = 4
    height: int | None = None
    width: int | None = None
    reference: str | Path | None = None
    reference_stats: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    budget_tolerance: float = 1e-3

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ValueError(f"methods {unknown or []} not known; choose from {list(METHODS)}")
        for name in ("methods", "budgets", "keep_ratios", "guidance"):
            values = list(getattr(self, name))
            if len(set(values)) != len(values):
                raise ValueError(f"{name} {values} name one twice")
        if any(m != "full" for m in self.methods) and not (self.budgets or self.keep_ratios):
            raise ValueError(f"methods {[m for m in self.methods if m != 'full']} need budgets (--budgets TMACs) "
                             f"or keep ratios (--keep-ratios)")
        for keep in self.keep_ratios:
            check_keep_ratio(keep, "keep ratio")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets {list(self.budgets)}: each must be a positive number of TMACs")
        if not self.guidance or any(not 0 < g <= MAX_GUIDANCE for g in self.guidance):
            raise ValueError(f"guidance {list(self.guidance)}: give one or more scales, each in (0, {MAX_GUIDANCE:g}]")
        for name, least in (("steps", 1), ("batch", 1), ("images", 2), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"{name}={value!r} must be an integer >= {least}"
                                 + (" (a covariance needs two images)" if name == "images" else ""))
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps={self.steps} is more than the {MAX_STEPS} sampling steps taken")
        if (self.reference is None) == (self.reference_stats is None):
            raise ValueError("FID needs exactly one of --reference DIR (real images, e.g. COCO val2017) and "
                             "--reference-stats FILE.npz (their mu and sigma)")
        if self.reference is not None and not Path(self.reference).is_dir():
            raise ValueError(f"--reference {str(self.reference)!r} is not a folder")
        if self.reference_stats is not None and not Path(self.reference_stats).is_file():
            raise ValueError(f"--reference-stats {str(self.reference_stats)!r} is not a file")
        check_output(Path(self.out), folder=True)
        if self.dtype != "auto":
            try:
                resolve_dtype(self.dtype)
            except ValueError:
                raise ValueError(f"dtype {self.dtype!r}: choose auto or one of {list(DTYPES)} (or "
                                 f"{', '.join(DTYPE_ALIASES)})") from None


@dataclass(frozen=True)
class Run:
    """One set of images: a method at one budget (none for the full model) and guidance scale."""

    method: str
    budget: str | None
    guidance: float
    keep_ratio: float = 1.0
    plan: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return "-".join([self.method] + ([self.budget] if self.budget else []) + [f"g{self.guidance:g}"])

    def record(self) -> dict:
        method = METHODS[self.method]
        return {"method": self.method, "budget": self.budget, "guidance": self.guidance,
                "keep_ratio": self.keep_ratio, "preset": method.preset, "config": repr(method.config)}


def _runs(config: EvaluateConfig, plan: dict) -> list[Run]:
    runs = []
    if "full" in config.methods:
        full = {"keep_ratio": 1.0, "tmacs": plan["full_tmacs"], "tmacs_with_scoring": plan["full_tmacs"],
                "share": 1.0, "share_with_scoring": 1.0, "capped": False}
        runs += [Run("full", None, g, 1.0, full) for g in config.guidance]
    for budget in plan["budgets"]:
        for method in config.methods:
            if method != "full":
                cost = budget["methods"][method]
                runs += [Run(method, budget["label"], g, cost["keep_ratio"], cost) for g in config.guidance]
    return runs
