"""The evaluation's table and its FID-CLIP curves (supp. B.2, Fig. 5), drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLUMNS = ("method", "budget", "keep", "TMACs", "+work", "share", "CFG", "images", "FID", "CLIP")


def table(rows: list[dict]) -> str:
    """One line per method, budget and guidance scale. TMACs: the schedule average of one U-Net
    call on the CFG pair; +work: with the method's own work (scoring, recovery, matching), what
    the budgets match; share: of the full model's, with its work; CLIP: mean cosine (0-1)."""
    cells = [[r["method"], r["budget"] or "-", f"{r['keep_ratio']:.3f}" + (" cap" if r["capped"] else ""),
              f"{r['tmacs']:.4g}", f"{r['tmacs_with_scoring']:.4g}", f"{r['share_with_scoring']:.3f}",
              f"{r['guidance']:g}", str(r["images"]),
              f"{r['fid']:.2f}", f"{r['clip_score']:.4f}"] for r in rows]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [list(COLUMNS)] + cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n"


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def curves(rows: list[dict], path: Path, write, size: tuple[int, int] = (900, 600)) -> None:
    """FID against CLIP score, one line per method and budget through its guidance scales (each
    point labelled with its scale). ``write(path, save)`` writes the file (atomically)."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        name = row["method"] + (f" {row['budget']}" if row["budget"] else "")
        series.setdefault(name, []).append(row)
    xs, ys = [r["clip_score"] for r in rows], [r["fid"] for r in rows]

    def padded(values):
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or max(abs(high) * 0.05, 1e-3)
        return low - pad, high + pad

    (x0, x1), (y0, y1) = padded(xs), padded(ys)
    width, height = size
    left, right, top, bottom = 80, 220, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in _ticks(x0, x1):
        px, _ = at(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 18, height - bottom + 8), f"{x:.4g}", fill="black")
    for y in _ticks(y0, y1):
        _, py = at(x0, y)
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((8, py - 6), f"{y:.4g}", fill="black")
    draw.text(((left + width - right) / 2 - 60, height - 22), "CLIP score (cosine)", fill="black")
    draw.text((8, 12), "FID (lower is better)", fill="black")
    for index, (name, points) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        points = sorted(points, key=lambda r: r["guidance"])
        xy = [at(r["clip_score"], r["fid"]) for r in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for (px, py), row in zip(xy, points):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            draw.text((px + 5, py - 12), f"{row['guidance']:g}", fill=colour)
        legend_y = top + 16 * index
        draw.line([width - right + 12, legend_y + 6, width - right + 32, legend_y + 6], fill=colour, width=3)
        draw.text((width - right + 38, legend_y), name, fill="black")
    draw.text((width - right + 12, top + 16 * len(series) + 8), "labels: CFG scale", fill="black")
    write(path, lambda tmp: image.save(tmp, format="PNG"))
