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


def mask_sheet(
    image: Image.Image,
    kept: dict[str, torch.Tensor],
    latent_size: tuple[int, int],
    levels: dict[str, int],
    batch_index: int = -1,
    panel: int = 160,
) -> Image.Image:
    """One panel per pruned block: the image, darkened where tokens were pruned, titled with the
    block name and its kept share. ``kept``: block name -> [B, k] indices (``capture_kept_tokens``);
    ``levels``: block name -> feature level, which sets the token grid (latent / 2^(level-1))."""
    names = sorted(kept, key=lambda n: (levels[n], n))
    columns = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    title = 14
    sheet = Image.new("RGB", (columns * panel, rows * (panel + title)), "white")
    base = image.convert("RGB").resize((panel, panel))
    draw = ImageDraw.Draw(sheet)
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
