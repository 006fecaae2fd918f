"""The reference side of FID: real images (center-cropped and resized to the generated size) and
their statistics, computed in chunks over the ranks or read from an ``.npz``."""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import sha256_file, write_atomically
from .metrics import Metrics, statistics
from .chunks import _chunks, _fid_features, _merge, _read_features, _write_features
from .config import IMAGE_EXTENSIONS, EvaluateConfig


def _reference_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if len(files) < 2:
        raise ValueError(f"--reference {str(folder)!r} holds {len(files)} image(s); FID needs two or more")
    return files


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
        names = [(str(files[i].relative_to(folder)), sha256_file(files[i])) for i in indices]
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

