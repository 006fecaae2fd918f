"""Image and feature metrics in numpy alone, no feature network: PSNR and SSIM of two images (how
close a pruned sample stays to the full model's from the same noise), and the Frechet distance of
two feature sets (FID's formula, on any features). ``evaluate`` uses the Frechet distance where
clean-fid is absent; the captioned-shapes kit (``shapes/``) and the benchmarks use all three.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _as_float(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images of one shape (inf where they are equal)."""
    a, b = _as_float(a), _as_float(b)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian over the first two axes, 'valid' borders: [H, W, ...] -> [H-2r, W-2r, ...]."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    width = 2 * radius + 1
    rows = sum(taps[i] * x[i:x.shape[0] - width + 1 + i] for i in range(width))
    return sum(taps[i] * rows[:, i:x.shape[1] - width + 1 + i] for i in range(width))


def ssim(a, b, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03),
    averaged over pixels and channels; 1 for identical images."""
    a, b = _as_float(a), _as_float(b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a * mu_a
    var_b = _gaussian_filter(b * b) - mu_b * mu_b
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return float(value.mean())


def frechet_distance_of_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets ([N, D] each), as in FID:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.normal(size=(500, 3))
        >>> round(frechet_distance_of_features(a, a), 6), frechet_distance_of_features(a, a + 1) > 2.9
        (0.0, True)
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    return frechet_distance_of_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def frechet_distance_of_statistics(mu_a, cov_a, mu_b, cov_b) -> float:
    """``frechet_distance_of_features`` from the means ([D]) and covariances ([D, D]) of the two sets."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    # tr (S_a S_b)^(1/2) = tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): a symmetric PSD matrix, so eigh is exact.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
