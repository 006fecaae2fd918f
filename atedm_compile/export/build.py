"""Build a directory of step-specialised artefacts: one ONNX graph (and TensorRT engine) per phase.

The build is a linear list of named stages (load model -> trace + passes -> export ONNX -> clean
up -> check -> the backend's own stages (a TensorRT engine) -> manifest). Each stage says whether
it ran or why it was skipped; a stage is skipped when its output exists and was made from the same
inputs (a content key recorded in the manifest, which is rewritten after every stage, so an
interrupted build resumes). ``BuildConfig`` says what to build (``build_config``), ``reuse`` what
a rebuild keeps, ``directory`` how the folder is claimed, ``build_memory`` what the build holds.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from ..files import folder_atomically, write_atomically
from ..memory import check_fits, prunes, unet_bytes
from ..sizes import sampling_size
from ..schedule import make_schedule
from .backends import get_backend
from .build_config import BuildConfig
from .build_memory import EXPORT_OVERHEAD, build_memory, check_memory  # noqa: F401
from .contract import EXPORT_KEY, MANIFEST, PHASE_KEY, WEIGHTS, step_io_specs, used_inputs
from .directory import LOCK, MARKER, RAW, BuildDirectory, raw_export_dir  # noqa: F401
from .keys import sha256_file
from .manifest import Artefact, Manifest, PhaseEntry
from .onnx import UNFOLDED, WeightStore, export_graph_on_meta, export_phase, graph_module, share_weights, weight_arrays
from .reuse import start_manifest
from .stages import BuildStage, StageRecord, run_stages


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
    """The named stages that bring ``directory`` up to date for ``config`` (``stages()``), with the
    directory's lock held from here until ``close`` (or the end of a ``with`` block). ``build``
    runs them; each stage's ``skip()`` says, without doing anything, why it would be skipped.

    Example:
        >>> with BuildPlan(BuildConfig(model="tiny", num_steps=4), "out/tiny") as plan:  # doctest: +SKIP
        ...     [stage.name for stage in plan.stages()][:3]
        ['load model', 'trace + passes', 'export ONNX: prune-less']
    """

    def __init__(self, config: BuildConfig, directory: str | Path, log: Callable[[str], None] = print):
        self.config = config
        self.directory = Path(directory)
        self.log = log
        self.backend = get_backend(config.backend)
        self.backend.require()  # before any export: fail in seconds, not after minutes
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
        self._claimed = BuildDirectory(self.directory, log)
        self.created, self.waited = self._claimed.created, self._claimed.waited
        try:
            self.manifest = start_manifest(self)
        except BaseException:
            self.close()
            raise
        self.store = WeightStore(self.directory / WEIGHTS, self.manifest.weights_index)

    def close(self) -> None:
        """Release the directory's lock."""
        self._claimed.close()

    def __enter__(self) -> BuildPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    # -- stages -----------------------------------------------------------------------------

    def stages(self) -> list[BuildStage]:
        entries = self.manifest.phases

        stages = [
            BuildStage("load model", self._nothing_to_export, self._load_model),
            BuildStage("trace + passes", self._nothing_to_export, self._apply_passes),
        ]
        for entry in entries:
            stages.append(BuildStage(f"export ONNX: {entry.name}", partial(self._exported, entry),
                              partial(self._export, entry)))
            stages.append(BuildStage(f"clean up: {entry.name}", partial(self._cleaned, entry), partial(self._cleanup, entry)))
            stages.append(BuildStage(f"check: {entry.name}", partial(self._checked, entry), partial(self._check, entry)))
        if self.config.verify:
            from .verify import verify_phase

            stages += [BuildStage(f"verify: {entry.name}", lambda: None, partial(verify_phase, self, entry))
                       for entry in entries]
        for entry in entries:
            stages += self.backend.phase_stages(self, entry)
        stages.append(BuildStage("manifest", lambda: None, self._finish))
        return stages

    # Each stage is a pair of plain methods: why it can be skipped (None: it must run), and the work.

    def _nothing_to_export(self) -> str | None:
        entries = self.manifest.phases
        if all(self._onnx_current(e) or (raw_export_dir(self.directory, e) / "model.onnx").is_file() for e in entries):
            return "no phase needs exporting"
        return None

    def _load_model(self) -> None:
        self.real_unet()
        # The TorchScript exporter traces a copy on the meta device: nothing computed at full size.
        self.traced = self.meta_unet if self._on_meta else self.unet

    @property
    def _on_meta(self) -> bool:
        return self.config.exporter == "torchscript"

    def real_unet(self):
        """The U-Net with its weights (loaded once): the values of the phase graphs' weights."""
        import torch

        if self.unet is None:
            device = "cuda" if self.config.precision == "fp16" and torch.cuda.is_available() and not self._on_meta \
                else "cpu"
            self.unet = _load_unet(self.config.model, self.config.seed, self.config.precision, device)
        return self.unet

    @property
    def pruning_schedule(self):
        # The runner only prunes the blocks of the phase being exported; a full or cached step's
        # split is the graph module's (graph_module), so its own cached-step forward stays out.
        return replace(self.schedule, cache=None)

    def _branch(self) -> int | None:
        return self.config.cache.branch if self.config.cache is not None else None

    def all_inputs(self, entry: PhaseEntry) -> dict:
        """Every input of ``entry``'s graph module, also those its exported graph leaves out."""
        return step_io_specs(self.unet_config, self.config.batch, *self.latent, self.config.precision, entry.role,
                             self._branch())[0]

    def graph_module(self, unet, entry: PhaseEntry):
        return graph_module(unet, list(self.all_inputs(entry)), entry.role, self._branch())[0]

    def phase_name(self, entry: PhaseEntry) -> str:
        """The schedule phase whose pruning ``entry``'s graph runs (a cached graph: its phase's)."""
        return self.schedule.phase_at(entry.start).name

    def _apply_passes(self) -> None:
        from ..runner import apply

        self.runner = apply(self.traced, self.pruning_schedule, self.config.pruning)
        self.runner.start(self.schedule.num_steps)

    def _exported(self, entry: PhaseEntry) -> str | None:
        if self._onnx_current(entry):
            return f"{entry.onnx.file} is up to date"
        if (raw_export_dir(self.directory, entry) / "model.onnx").is_file():
            return f"raw export {raw_export_dir(self.directory, entry).relative_to(self.directory)} exists"
        return None

    def _export(self, entry: PhaseEntry) -> None:
        self.runner.use_phase(self.phase_name(entry))
        final = raw_export_dir(self.directory, entry)
        final.parent.mkdir(exist_ok=True)
        inputs, branch = self.all_inputs(entry), self._branch()
        with folder_atomically(final) as tmp:
            if self._on_meta:
                export_graph_on_meta(self.traced, inputs, tmp, self.config.opset, entry.role, branch)
            else:
                export_phase(self.unet, inputs, tmp / "model.onnx", self.config.exporter, self.config.opset,
                             entry.role, branch)

    def _cleaned(self, entry: PhaseEntry) -> str | None:
        return f"{entry.onnx.file} is up to date" if self._onnx_current(entry) else None

    def _cleanup(self, entry: PhaseEntry) -> None:
        import onnx

        raw = raw_export_dir(self.directory, entry)
        if (raw / UNFOLDED).is_file():  # exported on meta: the weights come from the U-Net, one at a time
            model = onnx.load(str(raw / "model.onnx"))
            state = self.graph_module(self.real_unet(), entry).state_dict()
            total = sum(t.numel() * t.element_size() for t in state.values())
            with _bar(f"weights: {entry.name}", total) as bar:
                arrays = weight_arrays(model, onnx.load(str(raw / UNFOLDED)), state, list(self.all_inputs(entry)),
                                       progress=bar.update)
                model = share_weights(model, self.store, arrays=arrays)
            del state
        else:
            model = share_weights(onnx.load(str(raw / "model.onnx")), self.store)
        # The graph says which phase it is: load compares this with the manifest.
        onnx.helper.set_model_props(model, {PHASE_KEY: entry.name, EXPORT_KEY: entry.export_key})
        if entry.role is not None:  # builds without a cache: every graph takes every input, as before
            entry.inputs = used_inputs(model, self.all_inputs(entry))
        file = f"{entry.name}.onnx"
        write_atomically(self.directory / file, model.SerializeToString())
        entry.onnx = Artefact.of(self.directory, file)
        entry.lint = None
        self._save()
        shutil.rmtree(raw)
        if not any((self.directory / RAW).iterdir()):
            (self.directory / RAW).rmdir()

    def _checked(self, entry: PhaseEntry) -> str | None:
        return "passed on this file before" if entry.onnx and entry.lint == entry.onnx.sha256 else None

    def _check(self, entry: PhaseEntry) -> None:
        from .lint import lint_file

        issues = lint_file(self.directory / entry.onnx.file)
        if issues:
            listing = "\n  ".join(map(str, issues[:20]))
            message = f"{entry.onnx.file}: {len(issues)} TensorRT-compatibility issues:\n  {listing}"
            if self.backend.strict_lint:
                raise ValueError(message)
            self.log(f"warning: {message}")
            return
        entry.lint = entry.onnx.sha256
        self._save()

    def record_engine(self, entry: PhaseEntry, file: str, key: str) -> None:
        """Record the file a backend's stage built for ``entry`` (under ``key``: what it was made from)."""
        entry.engine, entry.engine_key = Artefact.of(self.directory, file), key
        self._save()

    def _finish(self) -> None:
        missing = [e.name for e in self.manifest.phases if e.onnx is None]
        if missing:
            raise RuntimeError(f"phases {missing} have no ONNX graph after the build")
        self.manifest.complete = True
        self._save()


def build(config: BuildConfig, directory: str | Path, log: Callable[[str], None] = print) -> tuple[Manifest,
                                                                                                 list[StageRecord]]:
    """Build (or bring up to date) ``directory`` for ``config``: ``manifest.json``, one ONNX graph per
    phase sharing ``weights.bin``, and what the backend builds besides (TensorRT: one engine per phase).

    Returns the manifest and what every stage did. Refuses a non-empty directory it did not make.

    Example:
        >>> from atedm_compile.export import BuildConfig, build
        >>> manifest, steps = build(BuildConfig(model="tiny", num_steps=4), "out/tiny")  # doctest: +SKIP
        >>> [p.name for p in manifest.phases]  # doctest: +SKIP
        ['prune-less', 'pruned']
    """
    job = BuildPlan(config, Path(directory), log)
    try:
        records = run_stages(job.stages(), log)
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


def _bar(desc: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
