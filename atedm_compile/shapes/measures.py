"""Measures of the trained ``tiny-shapes`` models' samples under pruning (beside the image
metrics; ``benchmarks/quality.py`` uses them to compare methods at matched FLOPs).

Two things the image metrics of ``synthetic`` do not give:

- ``ShapeClassifier``: a small CNN trained on the synthetic data to read every attribute of a
  caption (colour, shape, size, position, pattern, background). Its penultimate features play
  the part Inception's play in FID: ``synthetic.frechet_distance`` (``evaluate.image_metrics``) of generated against rendered
  images.
- ``token_coverage`` / ``kept_share``: where the kept tokens of a pruned block land, as the share
  of the kept tokens' area that the object covers, next to the object's share of the image.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((8, 8), bool); mask[:4, :4] = True      # the object: the top-left quarter
    >>> coverage = token_coverage(mask, (4, 4))                 # 16 tokens of 2 x 2 pixels
    >>> kept_share(np.array([0, 1, 4, 5]), coverage), float(coverage.mean())
    (1.0, 0.25)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import synthetic

# Every attribute a caption names, and its values in a fixed order (the classifier's classes).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(synthetic.COLOURS),
    "shape": synthetic.SHAPES,
    "size": tuple(synthetic.SIZES),
    "position": tuple(synthetic.POSITIONS),
    "pattern": synthetic.PATTERNS,
    "background": synthetic.BACKGROUND_COLOURS,
}


def to_pixels(images) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (array, or a list of arrays / PIL images) -> float [N, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
                      for image in images]) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1


class ShapeClassifier(torch.nn.Module):
    """Four stride-2 conv stages (64 px -> 4 x 4) and a linear layer to ``features`` values, then one
    linear head per attribute. ``features(pixels)`` is the Frechet-distance embedding."""

    def __init__(self, width: int = 32, features: int = 64, size: int = 64):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width, 2 * width, 2 * width):
            layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.GroupNorm(8, out),
                       torch.nn.SiLU()]
            channels = out
        self.body = torch.nn.Sequential(*layers, torch.nn.Flatten(),
                                        torch.nn.Linear(channels * (size // 16) ** 2, features), torch.nn.SiLU())
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(features, len(values))
                                          for name, values in ATTRIBUTES.items()})
        self.size = size

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.size, self.size):
            raise ValueError(f"images of {tuple(pixels.shape[-2:])} px; this classifier reads {self.size} x {self.size}")
        return self.body(pixels)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(scene, name)) for scene in scenes])
            for name, values in ATTRIBUTES.items()}


def train_classifier(count: int = 4000, steps: int = 800, batch: int = 64, seed: int = 0, size: int = 64,
                     progress: bool = True) -> tuple[ShapeClassifier, dict[str, float]]:
    """A ``ShapeClassifier`` trained on ``count`` rendered images (seed ``seed``) and its accuracy
    per attribute on 500 held-out ones (seed ``seed + 1``). Deterministic for a given seed and
    thread count; about a minute on one core."""
    torch.manual_seed(seed)
    images, _, _, scenes = synthetic.make_dataset(count, seed=seed, size=size)
    pixels, labels = to_pixels(images), _labels(scenes)
    model = ShapeClassifier(size=size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=2):
        index = torch.from_numpy(rng.integers(count, size=batch))
        logits = model(pixels[index])
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    held_out, _, _, held_scenes = synthetic.make_dataset(500, seed=seed + 1, size=size)
    return model, accuracy(model, held_out, held_scenes)


@torch.no_grad()
def accuracy(model: ShapeClassifier, images, scenes) -> dict[str, float]:
    """Share of ``images`` whose every attribute the classifier reads as in ``scenes``."""
    logits = model(to_pixels(images))
    labels = _labels(scenes)
    return {name: (logits[name].argmax(-1) == labels[name]).float().mean().item() for name in ATTRIBUTES}


@torch.no_grad()
def features(model: ShapeClassifier, images, batch: int = 256) -> np.ndarray:
    """The classifier's embedding of uint8 images: [N, features] float64."""
    pixels = to_pixels(images)
    return torch.cat([model.features(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]).double().numpy()


def token_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The share of each token's pixels that the object covers: mask [H, W] bool on an image whose
    side is a multiple of the token grid's ``(rows, columns)`` -> [rows * columns] in [0, 1],
    row-major (the order of a block's tokens)."""
    mask = np.asarray(mask, bool)
    rows, columns = grid
    height, width = mask.shape
    if rows < 1 or columns < 1 or height % rows or width % columns:
        raise ValueError(f"a {height}x{width} mask does not split into a {rows}x{columns} token grid")
    cells = mask.reshape(rows, height // rows, columns, width // columns)
    return cells.mean(axis=(1, 3)).reshape(-1)


def kept_share(kept: np.ndarray, coverage: np.ndarray) -> float:
    """The share of the kept tokens' area inside the object: mean coverage of the kept indices."""
    kept = np.asarray(kept).reshape(-1)
    if kept.size == 0:
        raise ValueError("no kept tokens")
    if kept.min() < 0 or kept.max() >= coverage.size:
        raise ValueError(f"kept indices must lie in [0, {coverage.size}); got {kept.min()}..{kept.max()}")
    return float(coverage[kept].mean())
