"""Captioned, object-centric synthetic images and a detector that reads them back (the image
metrics, ``psnr``, ``ssim`` and ``frechet_distance``, live in ``evaluate.image_metrics`` and are
importable from here too).

Every image holds one object (a shape of a colour and size at one of nine places) on a plain,
striped or checkered background, with a caption that says all of it:
"a small red triangle at the top left on a striped blue background". Objects are drawn in
saturated colours, backgrounds in pale tints or greys, so a nearest-colour rule separates them:
that is what ``detect`` does, on real and on generated images alike.

Example:
    >>> scene = sample_scene(np.random.default_rng(0))
    >>> image, mask = render(scene)
    >>> detection = detect(image)
    >>> (detection.colour, detection.shape, detection.position) == (scene.colour, scene.shape, scene.position)
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..evaluate.image_metrics import frechet_distance_of_features as frechet_distance  # noqa: F401 (its old name)
from ..evaluate.image_metrics import frechet_distance_of_statistics, psnr, ssim  # noqa: F401 (their old home)

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
# Half the object's side, as a share of the image side.
SIZES = {"small": 0.12, "large": 0.22}
# (row, column) on a 3 x 3 grid, and how a caption says it.
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
_POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
PATTERNS = ("plain", "striped", "checkered")
_NEUTRALS = {"white": ((245, 245, 245), (215, 215, 215)), "gray": ((150, 150, 150), (185, 185, 185))}
BACKGROUND_COLOURS = (*_NEUTRALS, *COLOURS)
# Every word a caption can use, in a fixed order (the trained model's tokenizer makes each one token).
VOCABULARY = tuple(dict.fromkeys(
    " ".join(("a on background", *SIZES, *COLOURS, *SHAPES, *_POSITION_PHRASES.values(), *PATTERNS,
              *BACKGROUND_COLOURS)).split()))
# Stripe width and checker cell, as a share of the image side.
_TEXTURE_PERIOD = 1 / 8
# Anti-aliased drawing: render this many times larger, then box-downsample.
_SUPERSAMPLE = 4


def _tint(rgb, amount: float) -> tuple[int, int, int]:
    return tuple(round(amount * c + (1 - amount) * 255) for c in rgb)


def background_pair(colour: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The two colours of a background (a plain one uses the first): greys, or pale tints."""
    if colour in _NEUTRALS:
        return _NEUTRALS[colour]
    return _tint(COLOURS[colour], 0.4), _tint(COLOURS[colour], 0.15)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    pattern: str
    background: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} {_POSITION_PHRASES[self.position]} "
                f"on a {self.pattern} {self.background} background")


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly drawn scene."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    return Scene(pick(SHAPES), pick(tuple(COLOURS)), pick(tuple(SIZES)), pick(tuple(POSITIONS)), pick(PATTERNS),
                 pick(BACKGROUND_COLOURS))


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes (the inverse of ``Scene.caption``)."""
    words = "|".join
    match = re.fullmatch(
        rf"an? ({words(SIZES)}) ({words(COLOURS)}) ({words(SHAPES)}) (?:at|on|in) the ({words(POSITIONS)}) "
        rf"on an? ({words(PATTERNS)}) ({words(BACKGROUND_COLOURS)}) background",
        caption.strip().lower(),
    )
    if match is None:
        raise ValueError(f"not a caption of this data set: {caption!r}")
    size, colour, shape, position, pattern, background = match.groups()
    return Scene(shape, colour, size, position, pattern, background)


def _object_box(scene: Scene, side: float, jitter: np.ndarray) -> tuple[float, float, float]:
    half = SIZES[scene.size] * side
    row, column = POSITIONS[scene.position]
    # Columns 0 / 1 / 2 put the object against the left edge / centred / against the right edge,
    # so that its centre stays inside its third of the image for both sizes.
    centre_x = half + (side - 2 * half) * column / 2 + jitter[0]
    centre_y = half + (side - 2 * half) * row / 2 + jitter[1]
    return centre_x, centre_y, half


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def render(scene: Scene, size: int = 64, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """The image ([size, size, 3] uint8) and object mask ([size, size] bool) of a scene.

    ``jitter`` moves the object by that many pixels (x, y); keep it within ``size / 32``.
    """
    big = size * _SUPERSAMPLE
    first, second = background_pair(scene.background)
    canvas = np.empty((big, big, 3), np.uint8)
    canvas[:] = first
    if scene.pattern != "plain":
        period = max(1, round(big * _TEXTURE_PERIOD))
        index = np.arange(big) // period
        if scene.pattern == "striped":
            alternate = np.broadcast_to(index[None, :] % 2 == 1, (big, big))
        else:
            alternate = (index[:, None] + index[None, :]) % 2 == 1
        canvas[alternate] = second
    picture = Image.fromarray(canvas)
    alpha = Image.new("L", (big, big), 0)
    cx, cy, half = _object_box(scene, big, np.asarray(jitter) * _SUPERSAMPLE)
    _draw_shape(ImageDraw.Draw(picture), scene.shape, cx, cy, half, COLOURS[scene.colour])
    _draw_shape(ImageDraw.Draw(alpha), scene.shape, cx, cy, half, 255)
    image = np.asarray(picture.resize((size, size), Image.Resampling.BOX))
    mask = np.asarray(alpha.resize((size, size), Image.Resampling.BOX)) >= 128
    return image, mask


def make_dataset(count: int, seed: int = 0, size: int = 64):
    """``count`` seeded samples: images [count, size, size, 3] uint8, masks [count, size, size]
    bool, captions and scenes. The same seed gives the same data."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.empty((count, size, size), bool)
    scenes = []
    for i in range(count):
        scene = sample_scene(rng)
        jitter = rng.uniform(-size / 32, size / 32, 2)
        images[i], masks[i] = render(scene, size, tuple(jitter))
        scenes.append(scene)
    return images, masks, [s.caption for s in scenes], scenes


# -- detector --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    """The largest object of an image: its colour, shape, place and pixels."""

    colour: str
    shape: str
    position: str
    mask: np.ndarray = field(repr=False, compare=False)


def _palette() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    colours = list(COLOURS.values())
    for background in BACKGROUND_COLOURS:
        for shade in background_pair(background):
            names.append("background")
            colours.append(shade)
    return names, np.asarray(colours, np.float32)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (-1 outside it), by min-label propagation."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            return np.where(mask, labels, -1)
        labels = updated


def _shape_of(component: np.ndarray) -> str:
    rows, cols = np.nonzero(component)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = component.sum() / (height * width)
    # Filled share of the bounding box: square 1, circle pi/4 = 0.79, triangle 1/2.
    if fill > 0.89:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle"


def _position_of(component: np.ndarray) -> str:
    rows, cols = np.nonzero(component)
    side = np.array(component.shape, np.float32)
    centre = np.array([(rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2])
    row, column = np.clip((centre / side * 3).astype(int), 0, 2)
    return {v: k for k, v in POSITIONS.items()}[(row, column)]


def detect(image, min_pixels: int = 6) -> Detection | None:
    """The largest object of an image (PIL image or [H, W, 3] uint8 array), or None if no
    object colour covers ``min_pixels`` connected pixels.

    Each pixel takes the nearest colour of the palette (object colours, background shades); the
    largest 4-connected region of one object colour is the object. Its colour names it, the filled
    share of its bounding box gives the shape, the box centre's third of the image the position.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    names, palette = _palette()
    nearest = ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)
    best = None
    for index, colour in enumerate(COLOURS):
        labels = _components(nearest == index)
        if labels.max() < 0:
            continue
        counts = np.bincount(labels[labels >= 0])
        label = counts.argmax()
        if counts[label] >= min_pixels and (best is None or counts[label] > best[0]):
            best = (counts[label], colour, labels == label)
    if best is None:
        return None
    _, colour, component = best
    return Detection(colour, _shape_of(component), _position_of(component), component)


def score(image, caption: str) -> dict[str, bool]:
    """Whether the image's largest object has the caption's colour, shape and position."""
    scene = parse_caption(caption)
    found = detect(image)
    if found is None:
        return {"colour": False, "shape": False, "position": False}
    return {"colour": found.colour == scene.colour, "shape": found.shape == scene.shape,
            "position": found.position == scene.position}
