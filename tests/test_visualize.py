import numpy as np
import torch
from PIL import Image

from atedm_compile.visualize import LEGEND_HEIGHT, mask_sheet


def test_mask_sheet_has_a_panel_per_block_and_a_legend():
    image = Image.new("RGB", (64, 64), "white")
    kept = {"down1.F": torch.tensor([[0, 1, 2, 3]]), "mid": torch.tensor([[0]])}
    sheet = mask_sheet(image, kept, (16, 16), {"down1.F": 2, "mid": 3}, panel=80)
    pixels = np.asarray(sheet.convert("L"))
    assert sheet.size == (160, 80 + 14 + LEGEND_HEIGHT)
    legend = pixels[-LEGEND_HEIGHT:]
    assert (legend < 128).sum() > 100  # swatches and text, not a blank band
    panel = pixels[14:14 + 80, :80]
    # down1.F: a 8 x 8 token grid, tokens 0-3 kept (bright), the rest darkened
    assert panel[:10, :40].mean() > 200 and panel[40:, :].mean() < 100
