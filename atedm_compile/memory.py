"""The least memory a run needs, checked before a model is loaded: a request that cannot fit is
refused with the numbers, instead of being killed by the kernel minutes later.

The estimates are lower bounds from the configs alone (weights not counted): the largest things
that must be in memory at once. A U-Net call keeps the level-1 feature maps of its input, its
current ResNet and the skip connections; a pruned attention block computes its first layer's
attention map, [B, N, N] in float32, and the head-combined copy of it (``ops.attention_with_map``);
the VAE decoder's last stage runs at the full image size.

``LiveBytes`` measures instead of estimating: the bytes of the tensors alive during a call and
their peak, on any device, the meta device included (``benchmarks/gpu_memory.py`` models a GPU's
activation memory with it on the CPU).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .devices import resolve_dtype



def prunes(phases) -> bool:
    """Whether any of ``phases`` (schedule phases or a manifest's) prunes a block: pruned blocks
    hold their first layer's attention map."""
    return any(keep < 1.0 for phase in phases for _, keep in phase.rules)


def unet_bytes(unet_config: dict, batch: int, latent_height: int, latent_width: int, precision: str = "fp32",
               pruned: bool = True) -> int:
    """Least memory of one U-Net call on a [batch, C, latent_height, latent_width] latent."""
    itemsize = resolve_dtype(precision).itemsize
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
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available here: torch {torch.__version__} sees no CUDA GPU")
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


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors made inside it that are still alive, and their peak: what
    a caching allocator would have handed out, less its rounding and fragmentation. Works on any
    device, the meta device included, so a GPU's activation memory can be modelled on the CPU
    with no memory at all (``benchmarks/gpu_memory.py``).

    Storage is counted once, when an operator first returns it (views and in-place results are
    not new), and uncounted when it is freed. Storages that exist before (weights, inputs) are not
    counted, not even when an operator returns a view of them: pass them to ``ignore`` (or create
    the mode after them and call ``ignore`` with the model's parameters and the inputs).

        >>> with LiveBytes() as live:
        ...     x = torch.ones(256, device="meta")
        ...     y = x * 2
        ...     del x
        >>> live.peak, live.live
        (2048, 1024)
    """

    def __init__(self, context=None):
        """``context``: a callable whose answer is kept with the peak (``peak_context``), e.g. the
        module running then."""
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self.peak_context = None
        self._context = context
        self._sizes: dict[int, int] = {}
        self._ignored: list = []

    def ignore(self, tensors) -> LiveBytes:
        """Storages of ``tensors`` (pre-existing ones) are never counted. Returns the mode."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            self._ignored.append(storage)
            self._sizes[id(storage)] = 0
        return self

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            weakref.finalize(storage, self._free, key)
            if self.live > self.peak:
                self.peak, self.peak_op = self.live, str(func)
                self.peak_context = self._context() if self._context else None
        return out
