"""Captions to evaluate on: a text file of one caption per line, or MS-COCO's ``captions_val2017.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Caption:
    text: str
    image_id: int | str | None = None  # COCO only
    file_name: str | None = None  # COCO only: the image the caption describes


def _clean(text: str) -> str:
    # COCO captions carry stray spaces and line breaks.
    return " ".join(str(text).split())


def read_captions(path: str | Path) -> list[Caption]:
    """The captions in ``path``, in a stable order.

    A ``.json`` file is read as COCO captions (``annotations`` with ``image_id`` and ``caption``):
    one caption per image, as the paper does (supp. A.4: "we deduplicate captions to make sure
    each image corresponds to a single caption"). Which one is ours to choose: the annotation with
    the lowest id; images in order of their id. Any other file: one caption per non-empty line.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "captions.txt"
        >>> _ = path.write_text("a red square\\n\\na blue circle\\n")
        >>> [c.text for c in read_captions(path)]
        ['a red square', 'a blue circle']
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ValueError(f"captions file {str(path)!r} is not UTF-8 text: line {line} holds byte "
                         f"0x{raw[error.start]:02x}") from None
    text = text.removeprefix("\ufeff")  # the byte-order mark some editors put first is no part of caption 0
    if path.suffix.lower() == ".json":
        captions = _coco_captions(path, text)
    else:
        captions = [Caption(_clean(line)) for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"captions file {str(path)!r} holds no caption")
    return captions


def _coco_captions(path: Path, text: str) -> list[Caption]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"captions file {str(path)!r} is not valid JSON: {error}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and {"image_id", "caption"} <= a.keys() for a in annotations):
        raise ValueError(f"captions file {str(path)!r} is JSON but not COCO captions: expected "
                         f"'annotations' entries with 'image_id' and 'caption'")
    for position, annotation in enumerate(annotations):
        for key in ("image_id", "id"):
            if key in annotation and (not isinstance(annotation[key], (int, str)) or isinstance(annotation[key], bool)):
                raise ValueError(f"captions file {str(path)!r}: annotation {position} has {key} "
                                 f"{annotation[key]!r}, neither an integer nor a string")
    images = [image for image in data.get("images", []) if isinstance(image, dict) and "id" in image]
    files = {image["id"]: image.get("file_name") for image in images if isinstance(image["id"], (int, str))}
    first: dict[int | str, tuple[int | str, str]] = {}  # image id -> (annotation id, caption)
    for position, annotation in enumerate(annotations):
        candidate = (annotation.get("id", position), annotation["caption"])
        image_id = annotation["image_id"]
        if image_id not in first or _order(candidate[0]) < _order(first[image_id][0]):
            first[image_id] = candidate
    return [Caption(_clean(first[image_id][1]), image_id, files.get(image_id)) for image_id in sorted(first, key=_order)]


def _order(identifier: int | str) -> tuple[bool, int | str]:
    # COCO's ids are integers; a file that mixes in strings sorts them after the integers.
    return isinstance(identifier, str), identifier
