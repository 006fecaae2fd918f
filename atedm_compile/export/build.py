"""Build a directory of step-specialised artefacts: one ONNX graph (and TensorRT engine) per phase.

The build is a linear list of named steps (load model -> trace + passes -> export ONNX -> clean
up -> check -> engine -> manifest). Each step says whether it ran or why it was skipped; a step
is skipped when its output exists and was made from the same inputs (a content key recorded in
the manifest, which is rewritten after every step, so an interrupted build resumes).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

from ..config import DEFAULT_PRUNING, DeepCacheConfig, PruningConfig, check_keep_ratio, check_number
from ..files import remove_leftovers, temp_prefix, write_atomically
from ..memory import check_fits, memory_limit, prunes, unet_bytes
from ..sizes import sampling_size
from ..schedule import PRESETS, make_schedule
from .extras import UnavailableError
from .manifest import (BACKENDS, EXPORT_KEY, MANIFEST, PHASE_KEY, PRECISIONS, WEIGHTS, Artefact, Manifest,
                       ManifestError, PhaseEntry, build_settings, carry_over, dropped_artefacts, export_key,
                       phase_graphs, read_manifest, reusable, sha256_file, sha256_json, step_io_specs, tool_versions,
                       used_inputs)
from .onnx import (DEFAULT_OPSET, EXPORTERS, OPSETS, UNFOLDED, WeightStore, export_graph_on_meta, export_phase,
                   graph_module, share_weights, weight_arrays)
from .onnxruntime import CPU_CACHE

MARKER = ".atedm-export"
LOCK = ".atedm-export.lock"
_RAW = ".raw"


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
        backend: ``onnxruntime`` (ONNX graphs) or ``tensorrt`` (plus one engine per phase).
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
    backend: str = "onnxruntime"
    exporter: str = "torchscript"
    opset: int = DEFAULT_OPSET
    seed: int = 0
    optimization_level: int = 3
    vae_factor: int | None = None
    verify: bool = False
    cache: DeepCacheConfig | None = None

    def __post_init__(self):
        for name, value, allowed in (("schedule", self.schedule, PRESETS), ("precision", self.precision, PRECISIONS),
                                     ("backend", self.backend, BACKENDS), ("exporter", self.exporter, EXPORTERS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
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


@dataclass
class Step:
    """One named build step: ``skip()`` returns why it can be skipped (or None), ``run()`` does it."""

    name: str
    skip: Callable[[], str | None]
    run: Callable[[], None]


@dataclass
class StepRecord:
    name: str
    ran: bool
    detail: str
    seconds: float


def run_steps(steps: list[Step], log: Callable[[str], None] = print) -> list[StepRecord]:
    """Run the steps in order; each says whether it ran (and how long it took) or why not."""
    from tqdm import tqdm

    records = []
    bar = tqdm(steps, desc="build", unit="step", leave=False)
    emit = bar.write if log is print else log  # print would tear the bar
    for i, step in enumerate(bar, 1):
        bar.set_postfix_str(step.name)
        reason = step.skip()
        if reason:
            records.append(StepRecord(step.name, False, reason, 0.0))
            emit(f"[{i}/{len(steps)}] {step.name}: skipped ({reason})")
            continue
        started = time.perf_counter()
        step.run()
        seconds = time.perf_counter() - started
        records.append(StepRecord(step.name, True, "done", seconds))
        emit(f"[{i}/{len(steps)}] {step.name}: done in {seconds:.1f} s")
    return records


def model_identity(model: str, seed: int) -> tuple[dict, dict, int]:
    """(identity, U-Net config, VAE factor) of a model, without loading its weights: what
    ``models.resolve_model`` says (``ModelSource.identity``; the config with every default spelled out)."""
    from ..models import resolve_model

    source = resolve_model(model)
    return source.identity(seed), source.full_unet_config(), source.vae_factor


def _load_unet(model: str, seed: int, precision: str, device: str):
    from ..devices import resolve_dtype
    from ..models import resolve_model

    return resolve_model(model).load_unet(seed, resolve_dtype(precision), device)


def _meta_unet(unet_config: dict, precision: str):
    """The U-Net of ``unet_config`` on the meta device: its graph, none of its memory."""
    from ..devices import resolve_dtype
    from ..models import build_unet, quiet_loading

    with quiet_loading():
        return build_unet(unet_config, device="meta", dtype=resolve_dtype(precision))


class BuildPlan:
    """The named steps that bring ``directory`` up to date for ``config`` (``steps()``), with the
    directory's lock held from here until ``close`` (or the end of a ``with`` block). ``build``
    runs them; each step's ``skip()`` says, without doing anything, why it would be skipped.

    Example:
        >>> with BuildPlan(BuildConfig(model="tiny", num_steps=4), "out/tiny") as plan:  # doctest: +SKIP
        ...     [step.name for step in plan.steps()][:3]
        ['load model', 'trace + passes', 'export ONNX: prune-less']
    """

    def __init__(self, config: BuildConfig, directory: str | Path, log: Callable[[str], None] = print):
        self.config = config
        self.directory = Path(directory)
        self.log = log
        if config.backend == "tensorrt":
            from .tensorrt import tensorrt_missing_reason

            reason = tensorrt_missing_reason()  # before any export: fail in seconds, not after minutes
            if reason:
                raise UnavailableError(reason)
        self.identity, self.unet_config, factor = model_identity(config.model, config.seed)
        height, width, self.vae_factor = sampling_size(self.unet_config, config.height, config.width,
                                                       vae_factor=config.vae_factor or factor)
        self.height, self.width = height, width
        self.latent = (height // self.vae_factor, width // self.vae_factor)
        if config.cache is not None:
            from ..caching import branch_position

            branch_position(self.unet_config, config.cache.branch)  # a branch this U-Net has, before any work
        self.schedule = make_schedule(config.schedule, config.num_steps, **config.schedule_options(),
                                      cache=config.cache)
        # A graph that no call of this machine's kind could run is refused even though the export
        # itself no longer runs it (the meta trace computes nothing).
        check_fits(unet_bytes(self.unet_config, config.batch, *self.latent, config.precision,
                              pruned=prunes(self.schedule.phases)),
                   "cuda" if config.precision == "fp16" and _cuda() else "cpu",
                   f"exporting at {width}x{height} px, batch {config.batch}")
        self.meta_unet = _meta_unet(self.unet_config, config.precision)
        self.memory = build_memory(self.meta_unet, config, unet_bytes(
            self.unet_config, config.batch, *self.latent, config.precision, pruned=prunes(self.schedule.phases)))
        check_memory(self.memory, f"building {config.model} at {width}x{height} px in {config.precision}", log)
        self.unet = None
        self.traced = None
        self.runner = None
        self.lock = None
        self.created = False
        self.waited = False
        self._claim_directory()
        try:
            self.manifest = self._start_manifest()
        except BaseException:
            self.close()
            raise
        self.store = WeightStore(self.directory / WEIGHTS, self.manifest.weights_index)

    # -- directory and manifest -------------------------------------------------------------

    def _claim_directory(self) -> None:
        """Make (or reuse) the directory and hold its lock until ``close``: a second build into it
        waits for this one, then finds its work done."""
        from filelock import FileLock, Timeout

        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"output {directory} exists and is not a directory")

        def foreign() -> bool:
            return (directory.is_dir() and not (directory / MARKER).exists()
                    and any(p.name != LOCK for p in directory.iterdir()))

        if foreign():
            raise ValueError(f"output directory {directory} is not empty and was not made by atedm-compile build "
                             f"(no {MARKER} in it): refusing to write there; pick an empty or new directory")
        self.created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.log(f"{directory} is locked by another build: waiting for it to finish")
            self.waited = True
            lock.acquire()
        self.lock = lock
        if foreign():  # made by another program while we waited
            self.close()
            raise ValueError(f"output directory {directory} is not empty and was not made by atedm-compile build")
        if not (directory / MARKER).exists():
            write_atomically(directory / MARKER, b"atedm-compile export directory\n")
        # Under the lock, a temporary file here can only be a dead build's; stale raw exports are
        # those of settings no longer asked for (each holds a full copy of the weights).
        for folder in (directory, directory / _RAW, directory / "engines"):
            for path in remove_leftovers(folder):
                self.log(f"removed {path.relative_to(directory)}, left by an interrupted build")

    def close(self) -> None:
        """Release the directory's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> BuildPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_manifest(self) -> Manifest:
        previous = None
        if (self.directory / MANIFEST).exists():
            try:
                previous = read_manifest(self.directory)
            except ManifestError as error:
                self.log(f"previous manifest not reused: {error}")
        config = self.config
        schedule = {"preset": config.schedule, "num_steps": config.num_steps, "options": config.schedule_options()}
        if config.cache is not None:  # left out without one: those manifests are written as before
            schedule["cache"] = asdict(config.cache)
        manifest = Manifest(
            model={**self.identity, "config": dict(self.unet_config)},
            schedule=schedule,
            pruning=asdict(config.pruning), batch=config.batch, height=self.height, width=self.width,
            latent=self.latent, precision=config.precision, backend=config.backend, exporter=config.exporter,
            opset=config.opset, tools=tool_versions(), phases=[], vae_factor=self.vae_factor,
        )
        manifest.tools["settings"] = sha256_json(build_settings(manifest))
        found = previous
        if self.waited and found is not None and found.tools.get("settings") != manifest.tools["settings"]:
            # Two builds of other settings raced into this folder: the one that came second does not
            # undo the first's finished work behind its back.
            raise ValueError(f"{self.directory}: another build, of other settings (model {found.model['name']!r}), "
                             f"finished there while this one waited; refusing to replace it: use another --out, "
                             f"or run this build again to replace it")
        previous, reason = reusable(previous, manifest, self.directory)
        if reason:
            self.log(reason)
        if previous is None:
            (self.directory / WEIGHTS).unlink(missing_ok=True)
        phases = []
        branch = config.cache.branch if config.cache is not None else None
        for name, phase, role in phase_graphs(self.schedule):
            inputs, outputs = step_io_specs(self.unet_config, config.batch, *self.latent, config.precision, role,
                                            branch)
            rules = [list(r) for r in phase.rules]
            key = export_key(manifest, rules, inputs, role)
            phases.append(carry_over(PhaseEntry(name, phase.start, phase.stop, rules, inputs, outputs, key,
                                                role=role), previous))
        dropped = dropped_artefacts(found, phases)
        for file in dropped:
            (self.directory / file).unlink(missing_ok=True)
        if dropped:  # ONNX Runtime's optimised copies of those graphs, each with a copy of the weights
            shutil.rmtree(self.directory / CPU_CACHE, ignore_errors=True)
        wanted = {self._raw_dir(entry).name for entry in phases}
        for raw in (self.directory / _RAW).glob("*"):
            if raw.is_dir() and not raw.name.startswith(".") and raw.name not in wanted:
                shutil.rmtree(raw, ignore_errors=True)
        manifest.phases = phases
        manifest.weights = previous.weights if previous else None
        manifest.weights_index = previous.weights_index if previous else {}
        return manifest

    def _save(self) -> None:
        self.manifest.weights_index = self.store.index
        if (self.directory / WEIGHTS).exists():
            self.manifest.weights = Artefact.of(self.directory, WEIGHTS)
        self.manifest.save(self.directory)

    def _onnx_current(self, entry: PhaseEntry) -> bool:
        if entry.onnx is None or self.manifest.weights is None:
            return False
        path = self.directory / entry.onnx.file
        return path.is_file() and sha256_file(path) == entry.onnx.sha256

    # -- steps ------------------------------------------------------------------------------

    def steps(self) -> list[Step]:
        entries = self.manifest.phases

        steps = [
            Step("load model", self._nothing_to_export, self._load_model),
            Step("trace + passes", self._nothing_to_export, self._apply_passes),
        ]
        for entry in entries:
            steps.append(Step(f"export ONNX: {entry.name}", partial(self._exported, entry),
                              partial(self._export, entry)))
            steps.append(Step(f"clean up: {entry.name}", partial(self._cleaned, entry), partial(self._cleanup, entry)))
            steps.append(Step(f"check: {entry.name}", partial(self._checked, entry), partial(self._check, entry)))
        if self.config.verify:
            steps += [Step(f"verify: {entry.name}", lambda: None, partial(self._verify, entry)) for entry in entries]
        if self.config.backend == "tensorrt":
            for entry in entries:
                steps.append(Step(f"engine: {entry.name}", partial(self._engine_built, entry),
                                  partial(self._engine, entry)))
        steps.append(Step("manifest", lambda: None, self._finish))
        return steps

    # Each step is a pair of plain methods: why it can be skipped (None: it must run), and the work.

    def _nothing_to_export(self) -> str | None:
        entries = self.manifest.phases
        if all(self._onnx_current(e) or (self._raw_dir(e) / "model.onnx").is_file() for e in entries):
            return "no phase needs exporting"
        return None

    def _load_model(self) -> None:
        self._real_unet()
        # The TorchScript exporter traces a copy on the meta device: nothing computed at full size.
        self.traced = self.meta_unet if self._on_meta else self.unet

    @property
    def _on_meta(self) -> bool:
        return self.config.exporter == "torchscript"

    def _real_unet(self):
        """The U-Net with its weights (loaded once): the values of the phase graphs' weights."""
        import torch

        if self.unet is None:
            device = "cuda" if self.config.precision == "fp16" and torch.cuda.is_available() and not self._on_meta \
                else "cpu"
            self.unet = _load_unet(self.config.model, self.config.seed, self.config.precision, device)
        return self.unet

    @property
    def _pruning_schedule(self):
        # The runner only prunes the blocks of the phase being exported; a full or cached step's
        # split is the graph module's (graph_module), so its own cached-step forward stays out.
        return replace(self.schedule, cache=None)

    def _branch(self) -> int | None:
        return self.config.cache.branch if self.config.cache is not None else None

    def _all_inputs(self, entry: PhaseEntry) -> dict:
        """Every input of ``entry``'s graph module, also those its exported graph leaves out."""
        return step_io_specs(self.unet_config, self.config.batch, *self.latent, self.config.precision, entry.role,
                             self._branch())[0]

    def _graph_module(self, unet, entry: PhaseEntry):
        return graph_module(unet, list(self._all_inputs(entry)), entry.role, self._branch())[0]

    def _phase_name(self, entry: PhaseEntry) -> str:
        """The schedule phase whose pruning ``entry``'s graph runs (a cached graph: its phase's)."""
        return self.schedule.phase_at(entry.start).name

    def _apply_passes(self) -> None:
        from ..runner import apply

        self.runner = apply(self.traced, self._pruning_schedule, self.config.pruning)
        self.runner.start(self.schedule.num_steps)

    def _raw_dir(self, entry: PhaseEntry) -> Path:
        return self.directory / _RAW / f"{entry.name}-{entry.export_key[:16]}"

    def _exported(self, entry: PhaseEntry) -> str | None:
        if self._onnx_current(entry):
            return f"{entry.onnx.file} is up to date"
        if (self._raw_dir(entry) / "model.onnx").is_file():
            return f"raw export {self._raw_dir(entry).relative_to(self.directory)} exists"
        return None

    def _export(self, entry: PhaseEntry) -> None:
        self.runner.use_phase(self._phase_name(entry))
        final = self._raw_dir(entry)
        final.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final.name)))
        inputs, branch = self._all_inputs(entry), self._branch()
        try:
            if self._on_meta:
                export_graph_on_meta(self.traced, inputs, tmp, self.config.opset, entry.role, branch)
            else:
                export_phase(self.unet, inputs, tmp / "model.onnx", self.config.exporter, self.config.opset,
                             entry.role, branch)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _cleaned(self, entry: PhaseEntry) -> str | None:
        return f"{entry.onnx.file} is up to date" if self._onnx_current(entry) else None

    def _cleanup(self, entry: PhaseEntry) -> None:
        import onnx

        raw = self._raw_dir(entry)
        if (raw / UNFOLDED).is_file():  # exported on meta: the weights come from the U-Net, one at a time
            model = onnx.load(str(raw / "model.onnx"))
            state = self._graph_module(self._real_unet(), entry).state_dict()
            total = sum(t.numel() * t.element_size() for t in state.values())
            with _bar(f"weights: {entry.name}", total) as bar:
                arrays = weight_arrays(model, onnx.load(str(raw / UNFOLDED)), state, list(self._all_inputs(entry)),
                                       progress=bar.update)
                model = share_weights(model, self.store, arrays=arrays)
            del state
        else:
            model = share_weights(onnx.load(str(raw / "model.onnx")), self.store)
        # The graph says which phase it is: load compares this with the manifest.
        onnx.helper.set_model_props(model, {PHASE_KEY: entry.name, EXPORT_KEY: entry.export_key})
        if entry.role is not None:  # builds without a cache: every graph takes every input, as before
            entry.inputs = used_inputs(model, self._all_inputs(entry))
        file = f"{entry.name}.onnx"
        write_atomically(self.directory / file, model.SerializeToString())
        entry.onnx = Artefact.of(self.directory, file)
        entry.lint = None
        self._save()
        shutil.rmtree(raw)
        if not any((self.directory / _RAW).iterdir()):
            (self.directory / _RAW).rmdir()

    def _checked(self, entry: PhaseEntry) -> str | None:
        return "passed on this file before" if entry.onnx and entry.lint == entry.onnx.sha256 else None

    def _check(self, entry: PhaseEntry) -> None:
        from .lint import lint_file

        issues = lint_file(self.directory / entry.onnx.file)
        if issues:
            listing = "\n  ".join(map(str, issues[:20]))
            message = f"{entry.onnx.file}: {len(issues)} TensorRT-compatibility issues:\n  {listing}"
            if self.config.backend == "tensorrt":
                raise ValueError(message)
            self.log(f"warning: {message}")
            return
        entry.lint = entry.onnx.sha256
        self._save()

    def _verify(self, entry: PhaseEntry) -> None:
        import torch

        from ..runner import apply, remove
        from .onnx import example_inputs
        from .onnxruntime import OrtEngine, SharedWeights

        unet = self._real_unet()
        own = self.runner is None or self.traced is not unet  # the exported U-Net was a meta copy
        runner = apply(unet, self._pruning_schedule, self.config.pruning) if own else self.runner
        try:
            runner.start(self.schedule.num_steps)
            runner.use_phase(self._phase_name(entry))
            feed = example_inputs(self._all_inputs(entry), seed=1, device=next(unet.parameters()).device)
            with torch.no_grad():
                expected = self._graph_module(unet, entry)(*feed.values())
        finally:
            if own:
                remove(unet)
        expected = expected if isinstance(expected, tuple) else (expected,)
        shared = SharedWeights(self.directory / WEIGHTS, self.store.index)
        got = OrtEngine(self.directory / entry.onnx.file, shared, providers=["cpu"]).infer(feed)
        error = 0.0
        for name, value in zip(entry.outputs, expected):  # the latent, and a full step's deep features
            value = value.float().cpu()
            error = max(error, (got[name].float() - value).abs().max().item() / max(value.abs().max().item(), 1e-12))
        tolerance = 3e-2 if self.config.precision == "fp16" else 1e-4
        if not error <= tolerance:
            raise ValueError(f"{entry.onnx.file}: ONNX Runtime differs from PyTorch by {error:.2e} of the output's "
                             f"largest value (allowed {tolerance:.0e})")
        self.log(f"verify: {entry.name}: ONNX Runtime matches PyTorch within {error:.2e} of the largest value")

    def _engine_file(self, entry: PhaseEntry, key: str) -> str:
        return f"engines/{entry.name}-{key[:16]}.plan"

    def _engine_built(self, entry: PhaseEntry) -> str | None:
        from .tensorrt import engine_key

        key = engine_key(entry.onnx.sha256, entry.inputs, self.config.precision, self.config.optimization_level)
        path = self.directory / self._engine_file(entry, key)
        if entry.engine_key == key and path.is_file() and entry.engine and sha256_file(path) == entry.engine.sha256:
            return f"{entry.engine.file} is up to date"
        return None

    def _engine(self, entry: PhaseEntry) -> None:
        from .tensorrt import TIMING_CACHE, build_engine, engine_key

        key = engine_key(entry.onnx.sha256, entry.inputs, self.config.precision, self.config.optimization_level)
        file = self._engine_file(entry, key)
        build_engine(self.directory / entry.onnx.file, self.directory / file, entry.inputs, self.config.precision,
                     self.directory / TIMING_CACHE, self.config.optimization_level)
        entry.engine, entry.engine_key = Artefact.of(self.directory, file), key
        self._save()

    def _finish(self) -> None:
        missing = [e.name for e in self.manifest.phases if e.onnx is None]
        if missing:
            raise RuntimeError(f"phases {missing} have no ONNX graph after the build")
        self.manifest.complete = True
        self._save()


def build(config: BuildConfig, directory: str | Path, log: Callable[[str], None] = print) -> tuple[Manifest,
                                                                                                 list[StepRecord]]:
    """Build (or bring up to date) ``directory`` for ``config``: ``manifest.json``, one ONNX graph per
    phase sharing ``weights.bin``, and for the tensorrt backend one engine per phase.

    Returns the manifest and what every step did. Refuses a non-empty directory it did not make.

    Example:
        >>> from atedm_compile.export import BuildConfig, build
        >>> manifest, steps = build(BuildConfig(model="tiny", num_steps=4), "out/tiny")  # doctest: +SKIP
        >>> [p.name for p in manifest.phases]  # doctest: +SKIP
        ['prune-less', 'pruned']
    """
    job = BuildPlan(config, Path(directory), log)
    try:
        records = run_steps(job.steps(), log)
    except BaseException:
        if job.created and not (job.directory / MANIFEST).exists():
            shutil.rmtree(job.directory, ignore_errors=True)  # nothing worth resuming: leave nothing
        raise
    finally:
        if job.runner is not None:
            from ..runner import remove

            remove(job.traced)
        job.close()
    return job.manifest, records


# What a build holds besides the weights while the TorchScript exporter traces on meta tensors and
# the weights are written (two graphs of a phase, their ONNX protos, Python, torch and diffusers):
# 0.75 GiB measured on SD-XL base at 1024 px (benchmarks/export_benchmark.py --sdxl), doubled.
EXPORT_OVERHEAD = 3 << 29


def build_memory(meta_unet, config: BuildConfig, activations: int) -> dict[str, int]:
    """The memory a build holds at its peak, by part (bytes): the U-Net's weights at the chosen
    precision (the values the graphs' weights are written from), twice the largest tensor (one
    being folded and written), and the exporter. The dynamo exporter runs the U-Net at full size
    (its activations) and holds the exported program and its ONNX proto besides the model;
    ``verify`` adds the mapped weights file and both calls' activations."""
    weights = sum(p.numel() * p.element_size() for p in meta_unet.parameters())
    largest = max((p.numel() * p.element_size() for p in meta_unet.parameters()), default=0)
    parts = {"weights": weights, "folding": 2 * largest, "exporter": EXPORT_OVERHEAD}
    if config.exporter != "torchscript":
        parts.update({"activations": activations, "exported copies": 2 * weights})
    if config.verify:  # a PyTorch and an ONNX Runtime call, the latter on the weights file mapped
        parts.update({"verify": weights + 2 * activations})
    return parts


def check_memory(parts: dict[str, int], what: str, log: Callable[[str], None] = print) -> None:
    """Log what a build needs against the machine's memory; ValueError (one line, the numbers)
    when it cannot fit, before any work."""
    limit, source = memory_limit("cpu")
    needed = sum(parts.values())
    listing = " + ".join(f"{name} {value / 2**30:.2f}" for name, value in parts.items())
    if needed > limit:
        raise ValueError(f"{what} needs about {needed / 2**30:.1f} GiB of memory ({listing} GiB), more than the "
                         f"{limit / 2**30:.1f} GiB of {source}")
    log(f"memory: {what} needs about {needed / 2**30:.1f} GiB ({listing} GiB) of the {limit / 2**30:.1f} GiB "
        f"of {source}")


def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
