"""Build a directory of step-specialised artefacts: one ONNX graph (and TensorRT engine) per phase.

The build is a linear list of named steps (load model -> trace + passes -> export ONNX -> clean
up -> check -> engine -> manifest). Each step says whether it ran or why it was skipped; a step
is skipped when its output exists and was made from the same inputs (a content key recorded in
the manifest, which is rewritten after every step, so an interrupted build resumes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..config import DEFAULT_PRUNING, PruningConfig, check_keep_ratio
from ..schedule import PRESETS, make_schedule
from .manifest import (BACKENDS, FORMAT_VERSION, MANIFEST, PRECISIONS, WEIGHTS, Artefact, Manifest, ManifestError,
                       PhaseEntry, io_specs, read_manifest, sha256_file, sha256_json, tool_versions,
                       write_atomically)
from .onnx import DEFAULT_OPSET, EXPORTERS, WeightStore, export_phase, share_weights

MARKER = ".atedm-export"
_RAW = ".raw"


@dataclass(frozen=True)
class BuildConfig:
    """What to build.

    Args:
        model: a config name (``tiny``, ``tiny-sd15``, ``sdxl-base``...: random weights from
            ``seed``) or a local diffusers pipeline / U-Net directory.
        schedule, num_steps, keep_ratio, prune_less_blocks: the DSAP schedule (``make_schedule``).
        pruning: scoring and recovery settings (default: what ``apply`` runs, ``config.DEFAULT_PRUNING``).
        height, width: image size in pixels (default: the model's ``sample_size`` x 8).
        batch: the U-Net's batch: 2 per image with classifier-free guidance.
        precision: ``fp32`` or ``fp16`` (fp16 graphs are for GPUs).
        backend: ``onnxruntime`` (ONNX graphs) or ``tensorrt`` (plus one engine per phase).
        exporter: ``torchscript`` (``torch.onnx.export(dynamo=False)``, the default: 4x faster here,
            see benchmarks/export_exporters.py) or ``dynamo``.
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
    vae_factor: int = 8

    def __post_init__(self):
        for name, value, allowed in (("schedule", self.schedule, PRESETS), ("precision", self.precision, PRECISIONS),
                                     ("backend", self.backend, BACKENDS), ("exporter", self.exporter, EXPORTERS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch={self.batch!r} must be an integer >= 1 (2 per image with guidance)")
        check_keep_ratio(self.keep_ratio)
        make_schedule(self.schedule, self.num_steps, keep_ratio=self.keep_ratio,
                      prune_less_blocks=self.prune_less_blocks)

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


def model_identity(model: str, seed: int) -> tuple[dict, dict]:
    """(identity, U-Net config) of a model, without loading its weights.

    A config name is identified by name and seed (its weights are random from the seed); a
    directory by the sha256 of its U-Net weight files.
    """
    from ..models import UNET_CONFIGS, unet_config

    if model in UNET_CONFIGS:
        config = _with_defaults(unet_config(model))
        return {"name": model, "seed": seed, "config_sha256": sha256_json(config)}, config
    root = Path(model)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither a config name ({sorted(UNET_CONFIGS)}) nor a directory "
                         f"with a diffusers U-Net (config.json in it or in unet/)")
    config = json.loads((unet_dir / "config.json").read_text())
    files = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"name": str(root.resolve()), "files": {p.name: sha256_file(p) for p in files}}, _with_defaults(config)


def _with_defaults(config: dict) -> dict:
    # Pipelines read config keys a short config leaves to the constructor's defaults
    # (time_cond_proj_dim...); the manifest spells them all out.
    import inspect

    from diffusers import UNet2DConditionModel

    defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return json.loads(json.dumps({**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}))


def _load_unet(model: str, seed: int, precision: str, device: str):
    import torch

    from ..models import UNET_CONFIGS, build_unet

    if model in UNET_CONFIGS:
        unet = build_unet(model, seed=seed)
    else:
        from diffusers import UNet2DConditionModel

        root = Path(model)
        sub = "unet" if (root / "unet" / "config.json").is_file() else None
        unet = UNet2DConditionModel.from_pretrained(root, subfolder=sub).eval().requires_grad_(False)
    return unet.to(device, torch.float16 if precision == "fp16" else torch.float32)


class _Build:
    def __init__(self, config: BuildConfig, directory: Path, log):
        self.config = config
        self.directory = Path(directory)
        self.log = log
        if config.backend == "tensorrt":
            from .tensorrt import tensorrt_missing_reason

            reason = tensorrt_missing_reason()  # before any export: fail in seconds, not after minutes
            if reason:
                raise RuntimeError(reason)
        self.identity, self.unet_config = model_identity(config.model, config.seed)
        height = config.height or self.unet_config["sample_size"] * config.vae_factor
        width = config.width or self.unet_config["sample_size"] * config.vae_factor
        multiple = 2 ** (len(self.unet_config["down_block_types"]) - 1) * config.vae_factor
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of {multiple} for this model")
        self.height, self.width = height, width
        self.latent = (height // config.vae_factor, width // config.vae_factor)
        self.schedule = make_schedule(config.schedule, config.num_steps, **config.schedule_options())
        self.unet = None
        self.runner = None
        self._claim_directory()
        self.manifest = self._start_manifest()
        self.store = WeightStore(self.directory / WEIGHTS, self.manifest.weights_index)

    # -- directory and manifest -------------------------------------------------------------

    def _claim_directory(self) -> None:
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"output {directory} exists and is not a directory")
        if directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).exists():
            raise ValueError(f"output directory {directory} is not empty and was not made by atedm-compile build "
                             f"(no {MARKER} in it): refusing to write there; pick an empty or new directory")
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MARKER).exists():
            (directory / MARKER).write_text("atedm-compile export directory\n")

    def _settings(self) -> dict:
        # What the weights depend on: when it changes, nothing of an older build is reused.
        return {"model": self.identity, "precision": self.config.precision, "exporter": self.config.exporter,
                "opset": self.config.opset, "torch": tool_versions().get("torch")}

    def _start_manifest(self) -> Manifest:
        previous = None
        if (self.directory / MANIFEST).exists():
            try:
                previous = read_manifest(self.directory)
            except ManifestError as error:
                self.log(f"previous manifest not reused: {error}")
        if previous is not None and previous.tools.get("settings") != sha256_json(self._settings()):
            self.log("build settings changed (model, precision, exporter or opset): rebuilding from scratch")
            previous = None
        if previous is not None and previous.weights is not None:
            path = self.directory / previous.weights.file
            if not path.is_file() or sha256_file(path) != previous.weights.sha256:
                self.log(f"{WEIGHTS} is missing or altered: rebuilding every phase")
                previous = None
        if previous is None:
            (self.directory / WEIGHTS).unlink(missing_ok=True)
        config = self.config
        phases = []
        for phase in self.schedule.phases:
            inputs, outputs = io_specs(self.unet_config, config.batch, *self.latent, config.precision)
            key = sha256_json({"format": FORMAT_VERSION, "settings": self._settings(), "rules": phase.rules,
                               "pruning": asdict(config.pruning), "inputs": {k: v.to_dict() for k, v in inputs.items()},
                               "atedm": tool_versions()["atedm-compile"]})
            entry = PhaseEntry(phase.name, phase.start, phase.stop, [list(r) for r in phase.rules], inputs, outputs, key)
            old = next((p for p in previous.phases if p.name == phase.name), None) if previous else None
            if old is not None and old.export_key == key:
                entry.onnx, entry.lint, entry.engine, entry.engine_key = old.onnx, old.lint, old.engine, old.engine_key
            phases.append(entry)
        if previous is not None:
            current = {p.name for p in phases}
            for old in previous.phases:
                if old.name not in current:
                    for artefact in (old.onnx, old.engine):
                        if artefact is not None:
                            (self.directory / artefact.file).unlink(missing_ok=True)
        tools = tool_versions()
        tools["settings"] = sha256_json(self._settings())
        return Manifest(
            model={**self.identity, "config": dict(self.unet_config)},
            schedule={"preset": config.schedule, "num_steps": config.num_steps, "options": config.schedule_options()},
            pruning=asdict(config.pruning), batch=config.batch, height=self.height, width=self.width,
            latent=self.latent, precision=config.precision, backend=config.backend, exporter=config.exporter,
            opset=config.opset, tools=tools, phases=phases,
            weights=previous.weights if previous else None,
            weights_index=previous.weights_index if previous else {},
        )

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

        def nothing_to_export():
            if all(self._onnx_current(e) or (self._raw_dir(e) / "model.onnx").is_file() for e in entries):
                return "no phase needs exporting"
            return None

        steps = [
            Step("load model", nothing_to_export, self._load_model),
            Step("trace + passes", nothing_to_export, self._apply_passes),
        ]
        for entry in entries:
            steps.append(Step(f"export ONNX: {entry.name}", self._export_skip(entry), self._export(entry)))
            steps.append(Step(f"clean up: {entry.name}", self._cleanup_skip(entry), self._cleanup(entry)))
            steps.append(Step(f"check: {entry.name}", self._check_skip(entry), self._check(entry)))
        if self.config.backend == "tensorrt":
            for entry in entries:
                steps.append(Step(f"engine: {entry.name}", self._engine_skip(entry), self._engine(entry)))
        steps.append(Step("manifest", lambda: None, self._finish))
        return steps

    def _load_model(self) -> None:
        import torch

        device = "cuda" if self.config.precision == "fp16" and torch.cuda.is_available() else "cpu"
        self.unet = _load_unet(self.config.model, self.config.seed, self.config.precision, device)

    def _apply_passes(self) -> None:
        from ..runner import apply

        self.runner = apply(self.unet, self.schedule, self.config.pruning)
        self.runner.start(self.schedule.num_steps)

    def _raw_dir(self, entry: PhaseEntry) -> Path:
        return self.directory / _RAW / f"{entry.name}-{entry.export_key[:16]}"

    def _export_skip(self, entry):
        def skip():
            if self._onnx_current(entry):
                return f"{entry.onnx.file} is up to date"
            if (self._raw_dir(entry) / "model.onnx").is_file():
                return f"raw export {self._raw_dir(entry).relative_to(self.directory)} exists"
            return None
        return skip

    def _export(self, entry):
        def run():
            self.runner.use_phase(entry.name)
            final = self._raw_dir(entry)
            final.parent.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            try:
                export_phase(self.unet, entry.inputs, tmp / "model.onnx", self.config.exporter, self.config.opset)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return run

    def _cleanup_skip(self, entry):
        return lambda: f"{entry.onnx.file} is up to date" if self._onnx_current(entry) else None

    def _cleanup(self, entry):
        def run():
            import onnx

            raw = self._raw_dir(entry)
            model = share_weights(onnx.load(str(raw / "model.onnx")), self.store)
            file = f"{entry.name}.onnx"
            write_atomically(self.directory / file, model.SerializeToString())
            entry.onnx = Artefact.of(self.directory, file)
            entry.lint = None
            self._save()
            shutil.rmtree(raw)
            if not any((self.directory / _RAW).iterdir()):
                (self.directory / _RAW).rmdir()
        return run

    def _check_skip(self, entry):
        return lambda: "passed on this file before" if entry.onnx and entry.lint == entry.onnx.sha256 else None

    def _check(self, entry):
        def run():
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
        return run

    def _engine_file(self, entry: PhaseEntry, key: str) -> str:
        return f"engines/{entry.name}-{key[:16]}.plan"

    def _engine_skip(self, entry):
        def skip():
            from .tensorrt import engine_key

            key = engine_key(entry.onnx.sha256, entry.inputs, self.config.precision, self.config.optimization_level)
            path = self.directory / self._engine_file(entry, key)
            if entry.engine_key == key and path.is_file() and entry.engine and sha256_file(path) == entry.engine.sha256:
                return f"{entry.engine.file} is up to date"
            return None
        return skip

    def _engine(self, entry):
        def run():
            from .tensorrt import TIMING_CACHE, build_engine, engine_key

            key = engine_key(entry.onnx.sha256, entry.inputs, self.config.precision, self.config.optimization_level)
            file = self._engine_file(entry, key)
            build_engine(self.directory / entry.onnx.file, self.directory / file, entry.inputs, self.config.precision,
                         self.directory / TIMING_CACHE, self.config.optimization_level)
            entry.engine, entry.engine_key = Artefact.of(self.directory, file), key
            self._save()
        return run

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
    job = _Build(config, Path(directory), log)
    records = run_steps(job.steps(), log)
    if job.runner is not None:
        from ..runner import remove

        remove(job.unet)
    return job.manifest, records
