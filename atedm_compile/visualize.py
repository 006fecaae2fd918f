"""Pictures of where the pruning lands: the kept-token mask of each pruned block over the image."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def kept_mask(index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """index: [k] kept token positions on an height x width grid -> bool [height, width]."""
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[index.cpu()] = True
    return mask.view(height, width)


LEGEND_HEIGHT = 34


def _legend(draw: ImageDraw.ImageDraw, top: int, batch_index: int) -> None:
    """What the shading means, under the panels."""
    y = top + 4
    for x, fill, label in ((4, (235, 235, 235), "kept token"), (110, (40, 40, 40), "pruned token (darkened)")):
        draw.rectangle((x, y, x + 10, y + 10), fill=fill, outline="black")
        draw.text((x + 14, y), label, fill="black")
    image = "last image" if batch_index == -1 else f"image {batch_index}"
    draw.text((4, y + 15), f"per block, the last step's choice ({image} of the U-Net batch)", fill="black")


def mask_sheet(
    image: Image.Image,
    kept: dict[str, torch.Tensor],
    latent_size: tuple[int, int],
    levels: dict[str, int],
    batch_index: int = -1,
    panel: int = 160,
) -> Image.Image:
    """One panel per pruned block: the image, darkened where tokens were pruned, titled with the
    block name and its kept share, above a legend. ``kept``: block name -> [B, k] indices
    (``capture_kept_tokens``); ``levels``: block name -> feature level, which sets the token grid
    (latent / 2^(level-1))."""
    names = sorted(kept, key=lambda n: (levels[n], n))
    columns = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    title = 14
    sheet = Image.new("RGB", (max(columns * panel, 2 * panel), rows * (panel + title) + LEGEND_HEIGHT), "white")
    base = image.convert("RGB").resize((panel, panel))
    draw = ImageDraw.Draw(sheet)
    _legend(draw, rows * (panel + title), batch_index)
    for i, name in enumerate(names):
        scale = 2 ** (levels[name] - 1)
        grid = (latent_size[0] // scale, latent_size[1] // scale)
        mask = kept_mask(kept[name][batch_index], *grid)
        shade = Image.fromarray((mask.numpy() * 255).astype("uint8"), "L").resize((panel, panel), Image.NEAREST)
        tile = Image.composite(base, Image.blend(base, Image.new("RGB", base.size, "black"), 0.75), shade)
        x, y = (i % columns) * panel, (i // columns) * (panel + title)
        sheet.paste(tile, (x, y + title))
        share = mask.float().mean().item()
        draw.text((x + 2, y), f"{name}: kept {share:.0%}", fill="black")
    return sheet
