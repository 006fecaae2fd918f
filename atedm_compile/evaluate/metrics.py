"""The feature networks behind FID and the CLIP score, and the Frechet distance.

The paper's metrics (PAPER.md section 3, supp. A.4): FID by clean-fid ("clean" mode: PIL bicubic
resize to 299 px, the TorchScript Inception of StyleGAN2-ADA), the CLIP score by OpenCLIP ViT-g-14
(cosine of the image and caption embeddings; the paper reports e.g. 0.3284). Both libraries are
imported lazily (``pip install -c constraints/eval.txt -e '.[eval]'``), and their weights are read from the
user's caches only: nothing is downloaded here, and a missing piece is named in the error.

``Metrics`` is the seam: ``evaluate`` takes any object with the same three members, so other
feature networks (or the small random ones the tests use) run the same command.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INCEPTION_FILE = "inception-2015-12-05.pt"
# Where clean-fid's Inception weights are looked for: a user cache, then the folder clean-fid
# itself downloads them to on Linux ("/tmp", cleanfid.features.feature_extractor).
INCEPTION_SEARCH = (Path.home() / ".cache" / "clean-fid" / INCEPTION_FILE, Path("/tmp") / INCEPTION_FILE)
CLIP_MODEL = "ViT-g-14"
# The paper names ViT-g-14 but not its checkpoint; this one (the later, longer-trained LAION-2B
# run) is our choice.
CLIP_PRETRAINED = "laion2b_s34b_b88k"
EVAL_EXTRA = "pip install -c constraints/eval.txt -e '.[eval]'"


class MissingMetricDependency(RuntimeError):
    """A metric library or its weights are not on this machine."""


@dataclass
class Metrics:
    """Feature networks for FID and the CLIP score.

    Args:
        name: names the networks and their weights. Stored with every feature file, so that
            features of other networks are never mixed in (they are recomputed from the images).
        fid_features: ``images [B, H, W, 3] uint8 -> [B, D]`` features whose statistics give FID.
        clip_score: ``(images [B, H, W, 3] uint8, captions: list of B str) -> [B]`` cosine of each
            image's embedding and its caption's.

    Example:
        >>> import numpy as np
        >>> toy = Metrics("mean colour", lambda images: images.reshape(len(images), -1, 3).mean(1),
        ...               lambda images, captions: np.zeros(len(images)))
        >>> toy.fid_features(np.zeros((2, 8, 8, 3), np.uint8)).shape
        (2, 3)
    """

    name: str
    fid_features: Callable[[np.ndarray], np.ndarray]
    clip_score: Callable[[np.ndarray, list[str]], np.ndarray]


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> tuple[float, str]:
    """FID from two feature statistics (means [D], covariances [D, D]), and which code computed it.

    clean-fid's ``frechet_distance`` where clean-fid imports; otherwise (only with injected
    feature networks: the paper's Inception features need clean-fid anyway) the project's own,
    ``image_metrics.frechet_distance_of_statistics``, the same formula through a symmetric square root.
    """
    try:
        from cleanfid.fid import frechet_distance as library_distance
    except ImportError:
        from .image_metrics import frechet_distance_of_statistics

        return (frechet_distance_of_statistics(mu_a, sigma_a, mu_b, sigma_b),
                "atedm_compile.evaluate.image_metrics (clean-fid absent)")
    return float(library_distance(mu_a, sigma_a, mu_b, sigma_b)), "clean-fid"


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of [N, D] features, as clean-fid's ``fid_from_feats`` takes them."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def inception_weights(path: str | Path | None = None) -> Path | None:
    """clean-fid's Inception weights: ``path`` if given, else the first of ``INCEPTION_SEARCH``
    that exists; None when there are none."""
    for candidate in [Path(path)] if path else INCEPTION_SEARCH:
        if candidate.is_file():
            return candidate
    return None


def _hub_file(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def open_clip_weights(open_clip, model: str, pretrained: str) -> tuple[str | None, dict, str]:
    """Where OpenCLIP's ``pretrained`` weights for ``model`` lie in the user's caches (a file path
    is taken as it is), its preprocessing config, and where it was looked for."""
    if os.path.isfile(pretrained):
        return pretrained, {}, pretrained
    config = open_clip.get_pretrained_cfg(model, pretrained)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"open_clip has no pretrained weights {pretrained!r} for {model!r} and no such file; "
                         f"tags for {model!r}: {tags}")
    if config.get("hf_hub"):
        # As open_clip.pretrained.download_pretrained: "org/repo/" means its default file, and a
        # .safetensors twin is preferred.
        repo, filename = os.path.split(config["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        twin = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else (
            filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        names = [twin, filename] if twin else [filename]
        for name in names:
            found = _hub_file(repo, name)
            if found:
                return found, config, f"{repo}/{name}"
        return None, config, f"the Hugging Face cache (hf-hub {repo}, {' or '.join(names)})"
    cached = Path.home() / ".cache" / "clip" / os.path.basename(config.get("url", ""))
    return (str(cached) if cached.is_file() else None), config, str(cached)


class CleanFidInception:
    """clean-fid's Inception features in its "clean" mode, one image at a time through its own
    resizer (PIL bicubic to 299 x 299 on float pixels), as ``cleanfid.fid.get_folder_features``
    computes them from image files."""

    def __init__(self, weights: Path, device: torch.device):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if weights.name != INCEPTION_FILE:
            raise ValueError(f"clean-fid loads its Inception weights by the name {INCEPTION_FILE}; got {weights}")
        self.device = device
        self.model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()
        self.resize = build_resizer("clean")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = np.stack([self.resize(image) for image in images])  # [B, 299, 299, 3] float32, 0-255
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        return self.model(pixels).float().cpu().numpy()


class OpenClipScore:
    """Cosine of OpenCLIP's image and text embeddings (the CLIP score on the paper's 0-1 scale)."""

    def __init__(self, open_clip, model: str, weights: str, config: dict, device: torch.device):
        options = {f"image_{key}": config[source] for key, source in
                   (("mean", "mean"), ("std", "std"), ("interpolation", "interpolation"),
                    ("resize_mode", "resize_mode")) if source in config}
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=weights, device=device, **options)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images]).to(self.device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)).float(), dim=-1)
        return (image * text).sum(-1).cpu().numpy()


def paper_metrics(device: str | torch.device = "cpu", inception: str | Path | None = None,
                  clip_model: str = CLIP_MODEL, clip_pretrained: str = CLIP_PRETRAINED) -> Metrics:
    """The paper's metrics: clean-fid's Inception features and OpenCLIP ``clip_model`` (ViT-g-14).

    Args:
        device: where both networks run.
        inception: clean-fid's ``inception-2015-12-05.pt``; default: the first found of
            ``~/.cache/clean-fid/`` and ``/tmp/`` (where clean-fid itself downloads it).
        clip_model, clip_pretrained: an OpenCLIP model and its pretrained tag (looked up in the
            Hugging Face cache) or weights file.

    Raises ``MissingMetricDependency`` naming every library and weights file that is missing.
    """
    from ..export.extras import set_aside_broken_torchvision

    device = torch.device(device)
    missing = []
    libraries = {"clean-fid": "cleanfid", "open_clip_torch": "open_clip"}
    torchvision = set_aside_broken_torchvision()
    absent = [package for package, module in libraries.items() if torchvision or not _importable(module)]
    if torchvision:
        missing.append(f"a torchvision built for this torch: {torchvision}; {EVAL_EXTRA} installs a matching pair")
    elif absent:
        missing.append(f"the package(s) {', '.join(absent)}: {EVAL_EXTRA} (they need torchvision built for your torch)")
    weights = inception_weights(inception)
    if weights is None:
        places = [str(inception)] if inception else [str(p) for p in INCEPTION_SEARCH]
        url = "cleanfid.downloads_helper.inception_url"
        if "clean-fid" not in absent:
            from cleanfid.downloads_helper import inception_url as url
        missing.append(f"clean-fid's Inception weights {INCEPTION_FILE}: not at {' or '.join(places)}; download it "
                       f"once from {url} (clean-fid does so itself in cleanfid.fid.compute_fid) or pass --inception FILE")
    clip = None
    if "open_clip_torch" not in absent:
        import open_clip

        clip, config, looked = open_clip_weights(open_clip, clip_model, clip_pretrained)
        if clip is None:
            missing.append(f"OpenCLIP weights {clip_model} / {clip_pretrained}: not in {looked}; fetch them once "
                           f"where there is network: python -c \"import open_clip; open_clip.create_model_and_transforms("
                           f"'{clip_model}', pretrained='{clip_pretrained}')\", or pass --clip-pretrained FILE")
    if missing:
        raise MissingMetricDependency("the paper's metrics need " + "; ".join(missing))
    import open_clip

    return Metrics(
        name=f"clean-fid {INCEPTION_FILE} + open_clip {clip_model} {clip_pretrained}",
        fid_features=CleanFidInception(weights, device),
        clip_score=OpenClipScore(open_clip, clip_model, clip, config, device),
    )


def load_metrics(spec: str) -> Callable[[torch.device], Metrics]:
    """The factory ``module:function`` (or ``path/to/file.py:function``): called with the device,
    it returns a ``Metrics``."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"--metrics {spec!r} must be module:function or file.py:function")
    if module_name.endswith(".py"):
        if not Path(module_name).is_file():
            raise ValueError(f"--metrics {spec!r}: no file {module_name!r}")
        spec_ = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"--metrics {spec!r}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"--metrics {spec!r}: {module_name!r} has no function {function!r}")
    return factory
