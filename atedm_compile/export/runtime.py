"""Run the exported phase graphs as a diffusers pipeline's U-Net.

``ExportedUNet`` is a ``torch.nn.Module`` with the U-Net's config, called like the U-Net. It
feeds each call, as a dict of named tensors, to the engine of the phase that owns the current
step; the step comes from the scheduler of the pipeline calling it (``atedm_compile.steps``), or
from ``start`` / ``set_step`` outside a pipeline. A build with cached steps has a full and a cached
graph per phase: the deep features the last full step returned are kept between calls and fed to
the cached steps' graphs (``caching.CacheState``, reset at every new run, whose first call runs
full, as the PyTorch runner does).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ..caching import CacheState, step_roles
from ..config import PruningConfig
from ..devices import resolve_dtype
from ..runner import apply
from ..schedule import make_schedule
from ..steps import PhaseCall, StepTracker
from .backend import Backend
from .backends import get_backend
from .manifest import FEATURES_NAME, OUTPUT_NAME, Manifest, manifest_schedule, read_manifest, verify_artefacts

ON_MISMATCH = ("error", "fallback")


class ExportedUNet(torch.nn.Module):
    """The phase engines of a build directory behind a ``UNet2DConditionModel``-like interface.

    ``calls`` records (step, phase, role) of every call, as the PyTorch runner does (phase: the
    schedule's phase; role: ``full`` or ``cached``); a call that fell back to PyTorch is recorded
    with phase ``"<phase> (pytorch)"``.
    """

    def __init__(self, directory: Path, manifest: Manifest, engines: dict, device: str = "cpu",
                 fallback: torch.nn.Module | None = None, on_mismatch: str = "error"):
        super().__init__()
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch={on_mismatch!r} is not allowed; choose one of {list(ON_MISMATCH)}")
        if on_mismatch == "fallback" and fallback is None:
            raise ValueError("on_mismatch='fallback' needs the PyTorch U-Net to fall back to (fallback=pipe.unet)")
        self.directory = Path(directory)
        self.manifest = manifest
        self.engines = engines
        self.on_mismatch = on_mismatch
        self.fallback = fallback
        self._tracker = StepTracker()
        self._cache = manifest.cache
        self._cache_state = CacheState()
        self._fallback_runner = None
        self._attached: dict | None = None
        from diffusers.configuration_utils import FrozenDict

        self._config = FrozenDict(manifest.model["config"])
        phase = manifest.phases[0]
        self._inputs = phase.inputs
        # An empty buffer gives .device and .dtype the meaning diffusers pipelines expect.
        self.register_buffer("_anchor", torch.empty(0, dtype=resolve_dtype(phase.inputs["sample"].dtype),
                                                    device=device), persistent=False)
        if self._config.get("addition_embed_type") == "text_time":
            # SD-XL pipelines read this to check their time ids against the U-Net.
            width = self._config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    @property
    def config(self):
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # -- steps ------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self._tracker.step

    @property
    def num_steps(self) -> int | None:
        return self._tracker.num_steps

    @property
    def calls(self) -> list[PhaseCall]:
        """(step, phase) of every call of the current sampling run."""
        return self._tracker.calls

    def start(self, num_steps: int) -> None:
        """Begin a sampling run of ``num_steps`` steps (must be the built count, or fall back)."""
        self._tracker.start(num_steps)
        self._begin(num_steps)

    def _begin(self, num_steps: int) -> None:
        self._fallback_runner = None
        self._cache_state.reset()  # a cached step never reads another run's features
        if num_steps != self.manifest.num_steps:
            self._mismatch(f"{num_steps} sampling steps were asked for, but the phase graphs in {self.directory} "
                           f"were built for {self.manifest.num_steps} steps (phase boundaries "
                           f"{[(p.name, p.start, p.stop) for p in self.manifest.phases]})")

    def set_step(self, step: int) -> None:
        if self.num_steps is None:
            raise RuntimeError("no sampling run started: call start(num_steps) or attach(pipe) first")
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} is outside 0..{self.num_steps - 1}")
        self._tracker.step = step
        if self._fallback_runner is not None:
            self._fallback_runner.set_step(step)

    def attach(self, pipe) -> ExportedUNet:
        """Make this the U-Net of ``pipe`` (its scheduler gives the steps, as with ``apply``)."""
        self.detach(pipe)
        # A plain dict: assigning the replaced U-Net to an attribute would make it a submodule.
        self._attached = {"unet": pipe.unet}
        pipe.unet = self
        return self

    def detach(self, pipe) -> None:
        """Undo ``attach``: ``pipe`` gets its previous U-Net back. No-op if not attached."""
        if self._attached is None:
            return
        if pipe.unet is self:
            pipe.unet = self._attached["unet"]
        self._attached = None

    def _mismatch(self, message: str) -> None:
        if self.on_mismatch == "error":
            raise ValueError(message + "; rebuild with matching settings, or load with on_mismatch='fallback'")
        if self._fallback_runner is None:
            warnings.warn(f"{message}: falling back to the PyTorch runner (slower)", stacklevel=3)
            recorded = manifest_schedule(self.manifest)
            schedule = make_schedule(recorded.name, self.num_steps or self.manifest.num_steps,
                                     **self.manifest.schedule["options"], cache=recorded.cache)
            self._fallback_runner = apply(self.fallback, schedule, PruningConfig(**self.manifest.pruning))
            self._fallback_runner.start(schedule.num_steps)

    # -- calls ------------------------------------------------------------------------------

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict: bool = True,
                **unsupported):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        given = sorted(k for k, v in unsupported.items() if v is not None)
        if given:
            raise ValueError(f"the exported U-Net takes sample, timestep, encoder_hidden_states and "
                             f"added_cond_kwargs only; got {given}")
        position, new_run = self._tracker.locate(self, (sample, timestep), {})
        if position is not None:
            if new_run:
                self._begin(position.num_steps)
            self.set_step(position.step)
        if self.num_steps is None:
            raise RuntimeError("no sampling run started: attach(pipe) before sampling, or call start(num_steps)")
        feed = {"sample": sample, "encoder_hidden_states": encoder_hidden_states, **(added_cond_kwargs or {})}
        problems = [f"{name} {tuple(feed[name].shape)} (expected {spec.shape})" for name, spec in self._inputs.items()
                    if name not in ("timestep", FEATURES_NAME) and (name not in feed or tuple(feed[name].shape) != spec.shape)]
        if problems and self._fallback_runner is None:
            self._mismatch(f"inputs do not match the built shapes: {', '.join(problems)} (build: batch "
                           f"{self.manifest.batch}, {self.manifest.height}x{self.manifest.width} px)")
        if self._fallback_runner is not None:
            self._fallback_runner.set_step(self.step)
            out = self.fallback(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
            self.calls.append(PhaseCall(self.step, f"{self._fallback_runner.phase.name} (pytorch)",
                                        self._fallback_runner.role))
        else:
            role = self._role()
            entry = self.manifest.phase_at(self.step, role if self._cache is not None else None)
            feed["timestep"] = _scalar_timestep(timestep)
            if role == "cached":
                feed[FEATURES_NAME] = self._cache_state.read(timestep, self._cache.forecast)
            feed = {name: feed[name].to(self.device, resolve_dtype(spec.dtype)) for name, spec in entry.inputs.items()}
            results = self.engines[entry.name].infer(feed)
            if FEATURES_NAME in results:  # a full step: the features the next cached steps read
                self._cache_state.keep(timestep, results[FEATURES_NAME])
            out = results[OUTPUT_NAME].to(sample.device, sample.dtype)
            # The schedule's phase (a cached graph runs its phase's pruning), as the runner records it.
            self.calls.append(PhaseCall(self.step, self.manifest.phase_at(self.step).name, role))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


    def _role(self) -> str:
        """``full`` or ``cached`` for this call: the cache rule's role of the step, full for the
        first call of a run (no features yet, say img2img starting on a cached step)."""
        if self._cache is None:
            return "full"
        if step_roles(self._cache, self.manifest.num_steps)[self.step] == "cached" \
                and self._cache_state.features is not None:
            return "cached"
        return "full"


def _scalar_timestep(timestep) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError(f"the phase graphs take one timestep for the whole batch; got different ones: {t.tolist()}")
    return t[0]


def load(
    directory: str | Path,
    backend: str | None = None,
    providers: list[str] | None = None,
    fallback: torch.nn.Module | None = None,
    on_mismatch: str = "error",
    verify: bool = True,
    cuda_graphs: bool = False,
    cpu_cache: bool = True,
) -> ExportedUNet:
    """Load a build directory as a U-Net for a diffusers pipeline.

    Args:
        directory: made by ``build`` / ``atedm-compile build``.
        backend: a name in ``backends.BACKENDS`` (``onnxruntime``, ``tensorrt``); default: the one it was
            built for. UnavailableError where it cannot run here.
        providers: ONNX Runtime execution providers (``cpu``, ``cuda``, ``tensorrt`` or full names);
            default CUDA when present, else CPU.
        fallback, on_mismatch: with ``on_mismatch="fallback"``, a step count or input shape that does
            not match the build warns and runs ``fallback`` (the PyTorch U-Net the build came from)
            under the AT-EDM runner instead of raising ValueError.
        verify: check every artefact's sha256 against the manifest first (and the CPU cache's files
            against the sha256 recorded when it was made: an altered cache is made again).
        cuda_graphs: TensorRT only: replay each phase's launch as a CUDA graph.
        cpu_cache: ONNX Runtime on the CPU: run graphs optimised once for this CPU, whose weights
            all phases share (``onnxruntime.optimize_for_cpu``; the first load makes them). False
            optimises in every session at load, which costs memory per phase.

    Example:
        >>> from atedm_compile.export import build, BuildConfig, load  # doctest: +SKIP
        >>> build(BuildConfig(model="tiny", num_steps=4), "out/tiny")  # doctest: +SKIP
        >>> pipe = tiny_sdxl_pipeline()  # doctest: +SKIP
        >>> load("out/tiny").attach(pipe)  # doctest: +SKIP
        >>> image = pipe("a red cube", num_inference_steps=4, height=256, width=256).images[0]  # doctest: +SKIP
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    chosen = get_backend(backend or manifest.backend)
    chosen.require()
    chosen.check_options(providers)
    if verify:  # what the backend runs besides the graphs, where it runs the build's own
        verify_artefacts(directory, manifest, engines=chosen is get_backend(manifest.backend))
    engines = chosen.load(directory, manifest, providers=providers, cuda_graphs=cuda_graphs, cpu_cache=cpu_cache,
                          verify=verify, log=logging.getLogger(__name__).info)
    return ExportedUNet(directory, manifest, engines, chosen.device, fallback, on_mismatch)


@dataclass(frozen=True)
class RunRequest:
    """What a run of a build samples: the step count, image size and images per prompt (the
    U-Net batch: 2 per image with guidance), and the backend that runs the phase graphs."""

    steps: int
    height: int
    width: int
    images: int
    unet_batch: int
    backend: Backend


def plan_run(directory: Path, manifest: Manifest, *, steps: int | None = None, height: int | None = None,
             width: int | None = None, images: int | None = None, guidance: float = 5.0, backend: str | None = None,
             providers: list[str] | None = None, fallback: bool = False,
             vae_config: dict | None = None) -> RunRequest:
    """The sampling a run of the build in ``directory`` does, checked before anything is loaded.

    Defaults are the build's: its step count and size, and as many images as its batch holds.
    UnavailableError where the backend cannot run here. ValueError where the request does not
    match the build (unless ``fallback``: the PyTorch
    runner then takes those calls), where the run cannot fit in the memory of the device the
    backend runs on (``vae_config``: the pipeline's VAE, counted too where known), or where the
    backend's options (``providers``) cannot be honoured here.
    """
    from ..memory import prunes
    from ..sizes import check_sampling_memory, sampling_size

    guided = guidance > 1.0
    images = images or max(1, manifest.batch // (2 if guided else 1))
    steps = manifest.num_steps if steps is None else steps
    height, width, _ = sampling_size(manifest.model["config"], height, width, vae_factor=manifest.vae_factor,
                                     own=(manifest.height, manifest.width))
    unet_batch = images * (2 if guided else 1)
    given = {"U-Net batch": (manifest.batch, unet_batch), "steps": (manifest.num_steps, steps),
             "size": (f"{manifest.width}x{manifest.height} px", f"{width}x{height} px")}
    wrong = {k: v for k, v in given.items() if v[0] != v[1]}
    if wrong and not fallback:
        listing = ", ".join(f"{k}: built {a}, given {b}" for k, (a, b) in wrong.items())
        raise ValueError(f"the request does not match the build in {directory} ({listing}; the U-Net batch is "
                         f"images x 2 with guidance > 1); rebuild, or pass --fallback-pytorch")
    chosen = get_backend(backend or manifest.backend)
    chosen.require()
    check_sampling_memory(manifest.model["config"], vae_config, height, width, manifest.vae_factor, images,
                          unet_batch, prunes(manifest.phases), manifest.precision, chosen.device)
    chosen.check_options(providers)  # a provider this onnxruntime lacks: said before loading anything
    return RunRequest(steps, height, width, images, unet_batch, chosen)
