"""The memory a build holds at its peak, counted before any work, and the check against the machine."""

from __future__ import annotations

from typing import Callable

from ..memory import memory_limit


# What a build holds besides the weights while the TorchScript exporter traces on meta tensors and
# the weights are written (two graphs of a phase, their ONNX protos, Python, torch and diffusers):
# 0.75 GiB measured on SD-XL base at 1024 px (benchmarks/export_benchmark.py --sdxl), doubled.
EXPORT_OVERHEAD = 3 << 29


def build_memory(meta_unet, config, activations: int) -> dict[str, int]:
    """The memory a build holds at its peak, by part (bytes): the U-Net's weights at the chosen
    precision (the values the graphs' weights are written from), twice the largest tensor (one
    being folded and written), and the exporter. The dynamo exporter runs the U-Net at full size
    (its activations) and holds the exported program and its ONNX proto besides the model;
    ``verify`` adds the mapped weights file and both calls' activations."""
    weights = sum(p.numel() * p.element_size() for p in meta_unet.parameters())
    largest = max((p.numel() * p.element_size() for p in meta_unet.parameters()), default=0)
    parts = {"weights": weights, "folding": 2 * largest, "exporter": EXPORT_OVERHEAD}
    if config.exporter != "torchscript":
        parts.update({"activations": activations, "exported copies": 2 * weights})
    if config.verify:  # a PyTorch and an ONNX Runtime call, the latter on the weights file mapped
        parts.update({"verify": weights + 2 * activations})
    return parts


def check_memory(parts: dict[str, int], what: str, log: Callable[[str], None] = print) -> None:
    """Log what a build needs against the machine's memory; ValueError (one line, the numbers)
    when it cannot fit, before any work."""
    limit, source = memory_limit("cpu")
    needed = sum(parts.values())
    listing = " + ".join(f"{name} {value / 2**30:.2f}" for name, value in parts.items())
    if needed > limit:
        raise ValueError(f"{what} needs about {needed / 2**30:.1f} GiB of memory ({listing} GiB), more than the "
                         f"{limit / 2**30:.1f} GiB of {source}")
    log(f"memory: {what} needs about {needed / 2**30:.1f} GiB ({listing} GiB) of the {limit / 2**30:.1f} GiB "
        f"of {source}")
