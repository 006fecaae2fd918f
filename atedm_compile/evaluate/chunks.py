"""A run's chunks: ``batch`` captions generated together, their PNGs (each naming the run that made
it) and their features, each written atomically and reused by a rerun."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import write_atomically
from .metrics import Metrics, frechet_distance, statistics
from .plan import METHODS
from .config import Run


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

