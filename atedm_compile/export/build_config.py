"""What a build makes: ``BuildConfig``, checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_PRUNING, DeepCacheConfig, PruningConfig, check_keep_ratio, check_number
from ..schedule import PRESETS, make_schedule
from .backends import DEFAULT_BACKEND, get_backend
from .contract import PRECISIONS
from .onnx import DEFAULT_OPSET, EXPORTERS, OPSETS


@dataclass(frozen=True)
class BuildConfig:
    """What to build.

    Args:
        model: a config name (``tiny``, ``tiny-sd15``, ``sdxl-base``...: random weights from
            ``seed``), a shipped trained model (``tiny-shapes``) or the folder of one, or a local
            diffusers pipeline / U-Net directory.
        schedule, num_steps, keep_ratio, prune_less_blocks: the DSAP schedule (``make_schedule``).
        pruning: scoring and recovery settings (default: what ``apply`` runs, ``config.DEFAULT_PRUNING``).
        height, width: image size in pixels (default: ``sizes.sampling_size``'s rule, the one every
            command samples at: the model's own size; width = height where only the height is given).
        batch: the U-Net's batch: 2 per image with classifier-free guidance.
        precision: ``fp32`` or ``fp16`` (fp16 graphs are for GPUs).
        backend: a name in ``backends.BACKENDS``: ``onnxruntime`` (the ONNX graphs) or ``tensorrt``
            (plus one engine per phase).
        exporter: ``torchscript`` (``torch.onnx.export(dynamo=False)``, the default: 4x faster here,
            see benchmarks/export_exporters.py) or ``dynamo``.
        opset: ONNX opset, 14 (the first with scaled dot-product attention) to 20.
        vae_factor: pixels per latent cell (default: the model's own; 8 for the SD families).
        verify: after the build, run each phase graph in ONNX Runtime against the PyTorch U-Net
            in that phase on the same random inputs (at full size: a real U-Net call each, and
            the memory for it, which the pre-check counts).
        cache: DeepCache's cached steps across the phases (``DeepCacheConfig``): each phase then
            has a full-step graph that also returns the deep features at the cache's branch and,
            where the rule caches one of its steps, a cached-step graph that takes them
            (``manifest.phase_graphs``). None: one graph per phase, as without caching.
    """

    model: str = "tiny"
    schedule: str = "atedm"
    num_steps: int = 50
    keep_ratio: float = 0.37
    prune_less_blocks: str = "F-L"
    pruning: PruningConfig = DEFAULT_PRUNING
    height: int | None = None
    width: int | None = None
    batch: int = 2
    precision: str = "fp32"
    backend: str = DEFAULT_BACKEND
    exporter: str = "torchscript"
    opset: int = DEFAULT_OPSET
    seed: int = 0
    optimization_level: int = 3
    vae_factor: int | None = None
    verify: bool = False
    cache: DeepCacheConfig | None = None

    def __post_init__(self):
        for name, value, allowed in (("schedule", self.schedule, PRESETS), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
        get_backend(self.backend)
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter={self.exporter!r} is not allowed; choose one of {list(EXPORTERS)}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch={self.batch!r} must be an integer >= 1 (2 per image with guidance)")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r} must be a model name or a directory")
        if not isinstance(self.pruning, PruningConfig):
            raise ValueError(f"pruning={self.pruning!r} is not a PruningConfig")
        check_number("opset", self.opset, OPSETS.start, OPSETS.stop - 1, integer=True)
        check_number("optimization_level", self.optimization_level, 0, 5, integer=True)
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        for name in ("height", "width", "vae_factor"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 1, 1 << 20, integer=True)
        check_keep_ratio(self.keep_ratio)
        if self.cache is not None and not isinstance(self.cache, DeepCacheConfig):
            raise ValueError(f"cache={self.cache!r} is not a DeepCacheConfig (or None: no cached steps)")
        schedule = make_schedule(self.schedule, self.num_steps, keep_ratio=self.keep_ratio,
                                 prune_less_blocks=self.prune_less_blocks, cache=self.cache)
        schedule.role_at(0)  # the cache rule against the step count (a non-uniform center inside the run)

    def schedule_options(self) -> dict:
        return {"keep_ratio": self.keep_ratio, "prune_less_blocks": self.prune_less_blocks}
