"""The least memory a run needs, checked before a model is loaded: a request that cannot fit is
refused with the numbers, instead of being killed by the kernel minutes later.

The estimates are lower bounds from the configs alone (weights not counted): the largest things
that must be in memory at once. A U-Net call keeps the level-1 feature maps of its input, its
current ResNet and the skip connections; a pruned attention block computes its first layer's
attention map, [B, N, N] in float32, and the head-combined copy of it (``ops.attention_with_map``);
the VAE decoder's last stage runs at the full image size.
"""

from __future__ import annotations

import os
from pathlib import Path

_ITEMSIZE = {"fp32": 4, "fp16": 2}


def prunes(phases) -> bool:
    """Whether any of ``phases`` (schedule phases or a manifest's) prunes a block: pruned blocks
    hold their first layer's attention map."""
    return any(keep < 1.0 for phase in phases for _, keep in phase.rules)


def unet_bytes(unet_config: dict, batch: int, latent_height: int, latent_width: int, precision: str = "fp32",
               pruned: bool = True) -> int:
    """Least memory of one U-Net call on a [batch, C, latent_height, latent_width] latent."""
    itemsize = _ITEMSIZE[precision]
    channels = unet_config["block_out_channels"][0]
    feature_maps = 3 * batch * channels * latent_height * latent_width * itemsize
    attention = 0
    if pruned:
        for level, kind in enumerate(unet_config["down_block_types"]):
            if "CrossAttn" in kind:
                tokens = (latent_height >> level) * (latent_width >> level)
                attention = max(attention, 2 * batch * tokens * tokens * 4)
    return feature_maps + attention


def vae_decode_bytes(vae_config: dict, images: int, height: int, width: int) -> int:
    """Least memory of decoding ``images`` latents to height x width pixels (float32)."""
    return 2 * images * vae_config["block_out_channels"][0] * height * width * 4


def sampling_bytes(unet_config: dict, vae_config: dict | None, images: int, unet_batch: int, height: int, width: int,
                   vae_factor: int, pruned: bool = True, precision: str = "fp32") -> int:
    """Least memory of sampling ``images`` images of height x width px: a U-Net call on batch
    ``unet_batch`` (2 per image with guidance), then the VAE decoder (when its config is known)."""
    needed = unet_bytes(unet_config, unet_batch, height // vae_factor, width // vae_factor, precision, pruned)
    return needed + (vae_decode_bytes(vae_config, images, height, width) if vae_config else 0)


def memory_limit(device: str = "cpu") -> tuple[int, str]:
    """(bytes, what they are) of the memory a run on ``device`` can have at most: the GPU's memory,
    or the machine's RAM capped by the container's (cgroup) limit."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"memory of GPU {index}"
    limit, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = int(Path(cgroup).read_text().split()[0])
        except (OSError, ValueError, IndexError):  # absent, or "max": no limit
            continue
        if value < limit:
            limit, what = value, "this container's memory limit"
    return limit, what


def check_fits(needed: int, device: str, what: str) -> None:
    """ValueError when ``needed`` bytes exceed what ``device`` has, naming both."""
    limit, source = memory_limit(device)
    if needed > limit:
        raise ValueError(f"{what} needs at least {_gib(needed)} of memory, more than the {_gib(limit)} of "
                         f"{source}: use a smaller image size or batch")


def _gib(size: int) -> str:
    for power, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB")):
        if size >= 2**power:
            return f"{size / 2**power:,.1f} {unit}"
    return f"{size / 2**30:,.1f} GiB"
