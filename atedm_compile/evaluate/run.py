"""``evaluate``: the paper's FID / CLIP evaluation of pruning methods on a pipeline, sharded over ranks.

Work unit: a *chunk*, ``batch`` consecutive captions of one run (method, budget, guidance scale).
Chunks are dealt to ranks round-robin (chunk ``c`` to rank ``c % world``) and a chunk's images
are generated together, so every image comes out of the same batch, with the same per-caption
noise (seed + caption index, CPU generator), whatever the number of ranks: the table does not
depend on it. Each chunk leaves its images (``images/<run>/<index>.png``) and the features of
those images (``features/<run>/<chunk>.safetensors``), each written atomically; a rerun skips a
chunk whose features are there, and computes features from the images where only those are.
Features are gathered on rank 0 (``all_gather_object``), which computes the metrics and writes
the table (``results.txt``), every number (``results.json``) and the curves (``curves.png``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..arguments import check_output
from ..config import MAX_GUIDANCE, MAX_STEPS, check_keep_ratio
from ..devices import DTYPES
from ..files import write_atomically
from . import report, shards
from .captions import Caption, read_captions
from .metrics import Metrics, frechet_distance, paper_metrics, statistics
from .plan import METHODS, PLANNER_VERSION, plan_budgets

# The long names, as torch spells them, are taken too.
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # clean-fid's, less .npy


@dataclass
class EvaluateConfig:
    """Args:
    model: ``tiny-shapes`` (shipped), ``tiny`` or a diffusers pipeline folder / hub id in the cache.
    captions: a text file (one caption per line) or COCO ``captions_val2017.json``.
    out: the output folder; a rerun with the same settings resumes in it.
    methods: names in ``METHODS``: ``full``, ``atedm`` (the paper's), ``default`` (the package's
        ``DEFAULT_PRUNING``), ``atedm-dagger``, ``tome``, ``random``.
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
        if self.dtype != "auto" and DTYPE_ALIASES.get(self.dtype, self.dtype) not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose auto or one of {list(DTYPES)}")


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


def _differs(path: Path, wanted: dict, what: str) -> bool:
    """ValueError where ``path`` holds JSON other than ``wanted``; True where it is not there yet."""
    if not path.is_file():
        return True
    there = json.loads(path.read_text())
    differ = sorted(k for k in set(there) | set(wanted) if there.get(k) != wanted.get(k))
    if differ:
        was = "; ".join(f"{k} {there.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
        raise ValueError(f"{path.parent} holds {what} made with other settings ({was}); "
                         f"use another --out or the same settings")
    return False


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def _check_same(path: Path, wanted: dict, what: str) -> None:
    """Write ``wanted`` to ``path`` as JSON, or check that what is there says the same."""
    if _differs(path, wanted, what):
        _write_json(path, wanted)


def _caption_records(captions: list[Caption], seed: int) -> list[dict]:
    return [{"index": i, "caption": c.text, "seed": seed + i, "image_id": c.image_id, "file_name": c.file_name}
            for i, c in enumerate(captions)]


def _plan_key(config: EvaluateConfig, unet_config: dict, size: dict) -> dict:
    # diffusers' private config keys are bookkeeping, and _use_default_values is a list in set
    # order, which changes with Python's hash seed: left in, every new process solved again.
    unet = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    key = {"planner": PLANNER_VERSION, "unet": unet, "methods": list(config.methods), "budgets": list(config.budgets),
           "keep_ratios": list(config.keep_ratios), "steps": config.steps, **size, "tolerance": config.budget_tolerance}
    return json.loads(json.dumps(key, default=str))


def _check_rows_kept(out: Path, runs: list[str], images: int) -> None:
    """ValueError where ``results.json`` holds rows (or more images) that this run would drop."""
    path = out / "results.json"
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    had = record["settings"]["images"]
    dropped = [row["run"] for row in record["rows"] if row["run"] not in runs]
    if dropped or images < had:
        what = f"the rows {dropped}" if dropped else "its rows"
        raise ValueError(f"{path} holds {what} of {had} images, which this run ({images} images) would drop; rerun "
                         f"with every method, budget and guidance scale it holds and --images {had} or more (what "
                         f"is made is reused), or use another --out")


def _prepare(out: Path, settings: dict, captions: list[dict], config: EvaluateConfig, unet_config: dict, size: dict) -> dict:
    """Rank 0: check the settings and captions of ``out``, make (or reuse) the plan, then record them.

    Nothing is written before every check has passed, the plan's included (a budget it cannot reach)."""
    if not any((out / "images").glob("*/*.png")):
        # An earlier run stopped before its first image: its records hold nothing to keep.
        for record in [out / "settings.json", out / "captions.json", *(out / "images").glob("*/run.json")]:
            record.unlink(missing_ok=True)
    new_settings = _differs(out / "settings.json", settings, "images")
    saved = json.loads((out / "captions.json").read_text()) if (out / "captions.json").is_file() else []
    for old, new in zip(saved, captions):
        if old != new:
            raise ValueError(f"{out} holds images of other captions (caption {new['index']}: {old['caption']!r} there, "
                             f"{new['caption']!r} now); use another --out")
    key = _plan_key(config, unet_config, size)
    cached = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else {}
    if cached.get("key") == key:
        plan = cached["plan"]
    else:
        from ..models import build_unet

        print("solving the budgets' keep ratios (FLOPs on the meta device)...", file=sys.stderr)
        plan = plan_budgets(build_unet(unet_config, device="meta"), config.methods, config.budgets, config.keep_ratios,
                            config.steps, tolerance=config.budget_tolerance, **size)
    runs = _runs(config, plan)
    for run in runs:
        _differs(out / "images" / run.name / "run.json", run.record(), "images")
    _check_rows_kept(out, [run.name for run in runs], len(captions))
    if new_settings:
        _write_json(out / "settings.json", settings)
    if len(captions) > len(saved):
        _write_json(out / "captions.json", captions)
    if cached.get("key") != key:
        _write_json(out / "plan.json", {"key": key, "plan": plan})
    for run in runs:
        _check_same(out / "images" / run.name / "run.json", run.record(), "images")
    return plan


# -- chunks ------------------------------------------------------------------------------------

def _chunks(count: int, batch: int) -> list[list[int]]:
    return [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]


def _read_features(path: Path, indices: list[int], metrics: str, key: str) -> dict | None:
    """The features saved for a chunk, or None where there are none for these images and networks."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as saved:
        meta = saved.metadata() or {}
        if meta.get("metrics") != metrics or meta.get("key") != key:
            return None
        tensors = {name: saved.get_tensor(name) for name in saved.keys()}
    return tensors if "indices" in tensors and tensors["indices"].tolist() == indices else None


def _write_features(path: Path, tensors: dict, metrics: str, key: str) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"metrics": metrics, "key": key}))


def _fid_features(metrics: Metrics, images: np.ndarray) -> np.ndarray:
    features = np.asarray(metrics.fid_features(images), np.float32)
    if features.ndim != 2 or len(features) != len(images):
        raise ValueError(f"metrics {metrics.name!r}: fid_features gave shape {features.shape} for {len(images)} images")
    return features


def _generate(pipe, texts: list[str], seeds: list[int], guidance: float, steps: int, height: int, width: int) -> np.ndarray:
    from ..models import refuse_non_finite

    result = pipe(prompt=texts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
                  callback_on_step_end=refuse_non_finite)
    # diffusers hands back a transposed view: made contiguous, the images are laid out in memory as
    # when read back from their files, so feature networks see the very same input either way.
    return np.ascontiguousarray((np.clip(result.images, 0.0, 1.0) * 255).round().astype(np.uint8))


# Each generated PNG names the run that made it (method, budget, guidance, keep ratio, config): a
# plan solved again, or another release's, must not pass its images off as this run's.
PNG_RUN_KEY = "atedm-compile run"


def _made_by(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    with Image.open(path) as image:
        return image.text.get(PNG_RUN_KEY) == key


def _save_png(image: np.ndarray, path: Path, key: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_RUN_KEY, key)
    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


def _load_images(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def _run_chunks(run: Run, pipe, metrics: Metrics, captions: list[dict], chunks, shard, out: Path, size: dict,
                steps: int, counts: Counter, progress) -> dict[int, dict]:
    """This rank's chunks of ``run``: their features, made (or reused) on disk."""
    from ..runner import apply, remove

    images_dir, features_dir = out / "images" / run.name, out / "features" / run.name
    key = json.dumps(run.record(), sort_keys=True)
    method, applied, done = METHODS[run.method], False, {}
    try:
        for c in shard.mine(len(chunks)):
            indices = chunks[c]
            path = features_dir / f"{c:06d}.safetensors"
            found = _read_features(path, indices, metrics.name, key)
            if found is not None:
                done[c] = found
                counts["features reused"] += len(indices)
                progress.update()
                continue
            pngs = [images_dir / f"{i:06d}.png" for i in indices]
            if all(_made_by(p, key) for p in pngs):
                images = _load_images(pngs)
                counts["images read back"] += len(indices)
            else:
                if not applied and method.preset is not None:
                    apply(pipe, method.preset, method.config, keep_ratio=run.keep_ratio)
                applied = True
                images = _generate(pipe, [captions[i]["caption"] for i in indices], [captions[i]["seed"] for i in indices],
                                   run.guidance, steps, size["height"], size["width"])
                for image, png in zip(images, pngs):
                    if not _made_by(png, key):  # missing, or another run's: written (again)
                        _save_png(image, png, key)
                counts["images generated"] += len(indices)
            clip = np.asarray(metrics.clip_score(images, [captions[i]["caption"] for i in indices]), np.float32)
            if clip.shape != (len(indices),):
                raise ValueError(f"metrics {metrics.name!r}: clip_score gave shape {clip.shape} for {len(indices)} images")
            done[c] = {"indices": np.asarray(indices, np.int64), "fid": _fid_features(metrics, images), "clip": clip}
            _write_features(path, done[c], metrics.name, key)
            progress.update()
    finally:
        if applied:
            remove(pipe)
    return done


def _merge(gathered: list[dict[int, dict]]) -> dict[str, np.ndarray]:
    """Every rank's chunks, in caption order."""
    chunks = {c: tensors for part in gathered for c, tensors in part.items()}
    return {name: np.concatenate([chunks[c][name] for c in sorted(chunks)]) for name in chunks[min(chunks)]}


def _fid(features: np.ndarray, reference: dict) -> tuple[float, str]:
    mu, sigma = statistics(features)
    if mu.shape != np.shape(reference["mu"]):
        raise ValueError(f"FID features have {mu.shape[0]} dimensions, the reference statistics "
                         f"{np.shape(reference['mu'])[0]}: they come from other networks")
    return frechet_distance(mu, sigma, reference["mu"], reference["sigma"])


# -- reference ---------------------------------------------------------------------------------

def _reference_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise ValueError(f"--reference {str(folder)!r} holds {len(files)} image(s); FID needs two or more")
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def reference_image(path: Path, width: int, height: int) -> np.ndarray:
    """Center-cropped to the generated images' aspect ratio and resized to their size (supp. A.4:
    COCO images center-cropped and resized to 1024 px), PIL bicubic."""
    image = Image.open(path).convert("RGB")
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


def read_reference_stats(path: str | Path) -> dict:
    """mu, sigma (and the image count, where saved) of an ``.npz`` of FID statistics; ValueError
    naming the file when it is not one (no pickled objects are loaded)."""
    try:
        saved = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        # numpy takes what is no array file for a pickle, and suggests loading it: never here.
        why = "neither .npz nor .npy" if "pickle" in str(error) else str(error)
        raise ValueError(f"--reference-stats {str(path)!r} is not an .npz of FID statistics (mu and sigma): "
                         f"{why}") from None
    if not isinstance(saved, np.lib.npyio.NpzFile):
        raise ValueError(f"--reference-stats {str(path)!r} holds one array, not an .npz of mu and sigma")
    with saved:
        if not {"mu", "sigma"} <= set(saved.files):
            raise ValueError(f"--reference-stats {str(path)!r} holds {saved.files}, not mu and sigma")
        mu, sigma = saved["mu"], saved["sigma"]
        count = int(saved["count"]) if "count" in saved.files else None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"--reference-stats {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} are not a "
                         f"vector and its square covariance")
    return {"mu": mu, "sigma": sigma, "images": count}


def _reference_statistics(config: EvaluateConfig, files: list[Path], metrics: Metrics, shard, out: Path, size: dict,
                          counts: Counter, progress) -> dict:
    """mu and sigma of the reference images' FID features (computed in chunks over the ranks, or
    read), on rank 0: only it measures."""
    if config.reference_stats is not None:
        read = functools.partial(read_reference_stats, config.reference_stats)
        return {**(shard.from_rank0(read, share=False) or {}), "kind": "statistics", "path": str(config.reference_stats)}
    folder = Path(config.reference)
    chunks = _chunks(len(files), config.batch)
    done = {}
    for c in shard.mine(len(chunks)):
        indices = chunks[c]
        # Keyed by content: another folder's files of the same names and sizes are other images.
        names = [(str(files[i].relative_to(folder)), _sha256(files[i])) for i in indices]
        key = hashlib.sha256(json.dumps([names, size["width"], size["height"]]).encode()).hexdigest()
        path = out / "features" / "reference" / f"{c:06d}.safetensors"
        found = _read_features(path, indices, metrics.name, key)
        if found is None:
            images = np.stack([reference_image(files[i], size["width"], size["height"]) for i in indices])
            found = {"indices": np.asarray(indices, np.int64), "fid": _fid_features(metrics, images)}
            _write_features(path, found, metrics.name, key)
            counts["reference features computed"] += len(indices)
        done[c] = found
        progress.update()
    gathered = shard.gather(done)

    def stats():
        mu, sigma = statistics(_merge(gathered)["fid"])

        def save(tmp):
            with open(tmp, "wb") as file:  # a file object: np.savez would add .npz to a name
                np.savez(file, mu=mu, sigma=sigma, count=len(files))

        write_atomically(out / "reference.npz", save)
        return {"mu": mu, "sigma": sigma, "images": len(files)}

    return {**(shard.from_rank0(stats, share=False) or {}), "kind": "folder", "path": str(folder)}


# -- the command -------------------------------------------------------------------------------

def evaluate(config: EvaluateConfig, metrics: Metrics | Callable[[torch.device], Metrics] | None = None) -> dict:
    """Generate every run's images, measure FID and the CLIP score, write the table, JSON and curves.

    Runs alone or in each process ``torchrun`` starts (they share the work, see the module
    docstring). ``metrics``: a ``Metrics``, or a factory called with this rank's device that
    returns one; default ``paper_metrics`` (clean-fid Inception, OpenCLIP ViT-g-14).

    Returns what ``results.json`` holds, on every rank.

    Example (the shipped toy model, a metrics factory of your own):
        >>> from atedm_compile.evaluate import EvaluateConfig, evaluate  # doctest: +SKIP
        >>> record = evaluate(EvaluateConfig("tiny-shapes", "captions.txt", "out/eval", methods=["full", "atedm"],
        ...                                  keep_ratios=[0.5], steps=4, reference="shapes/"),
        ...                   metrics=my_metrics)  # doctest: +SKIP
        >>> [(r["method"], r["fid"], r["clip_score"]) for r in record["rows"]]  # doctest: +SKIP
    """
    config.check()
    captions = read_captions(config.captions)
    if config.images is not None:
        if config.images > len(captions):
            raise ValueError(f"images={config.images}: {config.captions} holds only {len(captions)} captions")
        captions = captions[:config.images]
    elif len(captions) < 2:
        raise ValueError(f"{config.captions} holds {len(captions)} caption; FID needs two or more")
    if config.reference_stats is not None:
        read_reference_stats(config.reference_stats)  # a bad file: said before anything is made
    shard = shards.start(config.device)
    try:
        return _evaluate(config, metrics, _caption_records(captions, config.seed), shard)
    finally:
        shards.finish(shard)


def _evaluate(config: EvaluateConfig, metrics, captions: list[dict], shard) -> dict:
    from tqdm import tqdm

    from ..models import load_pipeline
    from ..sizes import preflight

    device = shard.device
    if metrics is None:
        metrics = paper_metrics(device)
    elif not isinstance(metrics, Metrics) and callable(metrics):
        made = metrics(device)
        if not isinstance(made, Metrics):
            raise ValueError(f"the metrics factory {getattr(metrics, '__name__', metrics)!r} returned "
                             f"{type(made).__name__}, not an atedm_compile.evaluate.Metrics")
        metrics = made
    dtype = (DTYPES[DTYPE_ALIASES.get(config.dtype, config.dtype)] if config.dtype != "auto"
             else torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(config.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    vae_config = dict(pipe.vae.config) if getattr(pipe, "vae", None) is not None else None
    height, width, vae_factor = preflight(
        dict(pipe.unet.config), vae_config, config.height, config.width, config.batch,
        vae_factor=getattr(pipe, "vae_scale_factor", 8), precision="fp32" if dtype == torch.float32 else "fp16",
        device=str(device))
    size = {"height": height, "width": width}
    out = Path(config.out)
    settings = {"model": config.model, "steps": config.steps, "seed": config.seed, "batch": config.batch, **size,
                "dtype": str(pipe.unet.dtype).removeprefix("torch."), "device": device.type}
    plan = shard.from_rank0(lambda: _prepare(out, settings, captions, config, dict(pipe.unet.config),
                                             dict(size, vae_factor=vae_factor)))
    runs = _runs(config, plan)

    chunks = _chunks(len(captions), config.batch)
    reference_files = [] if config.reference is None else _reference_files(Path(config.reference))
    reference_chunks = len(shard.mine(len(_chunks(len(reference_files), config.batch))))
    counts: Counter = Counter()
    progress = tqdm(total=len(runs) * len(shard.mine(len(chunks))) + reference_chunks, unit="chunk",
                    desc=f"rank 0 of {shard.world}: chunks of {config.batch}", disable=shard.rank != 0, file=sys.stderr)
    reference = _reference_statistics(config, reference_files, metrics, shard, out, size, counts, progress)
    measured, failure = [], None
    for run in runs:
        gathered = shard.gather(_run_chunks(run, pipe, metrics, captions, chunks, shard, out, size, config.steps,
                                            counts, progress))
        if shard.rank == 0 and failure is None:
            # An error here is raised in finish(), once every rank is there to hear of it.
            try:
                merged = _merge(gathered)
                measured.append((run, *_fid(merged["fid"], reference), merged["clip"]))
            except ValueError as error:
                failure = error
    progress.close()
    totals = sum((Counter(c) for c in shard.gather(dict(counts))), Counter())

    def finish():
        if failure is not None:
            raise failure
        rows = [{"run": run.name, "method": run.method, "budget": run.budget, "guidance": run.guidance,
                 "keep_ratio": run.plan["keep_ratio"], "capped": run.plan["capped"], "tmacs": run.plan["tmacs"],
                 "tmacs_with_scoring": run.plan["tmacs_with_scoring"], "share": run.plan["share"],
                 "share_with_scoring": run.plan["share_with_scoring"],
                 "images": len(clip), "fid": fid, "clip_score": float(np.mean(clip, dtype=np.float64))}
                for run, fid, _, clip in measured]
        record = {
            "settings": {**settings, "captions": str(config.captions), "images": len(captions),
                         "methods": list(config.methods), "budgets": list(config.budgets),
                         "keep_ratios": list(config.keep_ratios), "guidance": list(config.guidance),
                         "metrics": metrics.name, "frechet_distance": measured[0][2] if measured else None,
                         "reference": {"kind": reference["kind"], "path": reference["path"], "images": reference["images"]},
                         "units": {"tmacs": "TMACs of one U-Net call on the CFG pair, averaged over the schedule's steps",
                                   "clip_score": "mean cosine of each image's embedding and its caption's (the paper's 0-1 scale)"}},
            "plan": plan,
            "rows": rows,
            "clip_scores": {run.name: [float(x) for x in clip] for run, _, _, clip in measured},
        }
        text = report.table(rows)
        write_atomically(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
        write_atomically(out / "results.txt", lambda tmp: Path(tmp).write_text(text))
        if rows:
            report.curves(rows, out / "curves.png", write_atomically)
        print(text, end="")
        print(f"images: {totals['images generated']} generated, {totals['images read back']} read back; features of "
              f"{totals['features reused']} images reused, {totals['reference features computed']} reference images "
              f"measured; ranks: {shard.world}")
        print(f"wrote {out / 'results.txt'}, {out / 'results.json'} and {out / 'curves.png'}")
        return record

    return shard.from_rank0(finish)
