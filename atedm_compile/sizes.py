"""The image size a command samples at, and the checks before it samples.

One rule for ``generate``, ``build``, ``run``, ``evaluate`` (and ``flops``), so that the same model
and the same ``--height`` give the same image everywhere: see ``sampling_size``.
"""

from __future__ import annotations

from .memory import check_fits, sampling_bytes
from .models import check_image_size, own_height, vae_factor_of


def own_size(unet_config, vae_factor: int) -> tuple[int, int]:
    """(height, width) in pixels a model is made for: its U-Net's ``sample_size`` latent cells,
    one number for a square model or a [height, width] pair."""
    height = own_height(unet_config, vae_factor)
    size = (unet_config.get("sample_size") if isinstance(unet_config, dict)
            else getattr(unet_config, "sample_size", None))
    if isinstance(size, (list, tuple)) and len(size) == 2 and isinstance(size[1], int) and size[1] > 0:
        return height, size[1] * vae_factor
    return height, height


def sampling_size(unet_config, height: int | None = None, width: int | None = None, *, vae_factor: int | None = None,
                  vae_config: dict | None = None, own: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(height, width, VAE factor) of a run asked for ``height`` x ``width`` px (None: not given),
    checked against the U-Net's size multiple (ValueError naming the size otherwise).

    The default rule, the same for every command:
    - neither given: the model's own size (``own``, e.g. a build's size for ``run``; else the U-Net
      config's ``sample_size`` times the VAE factor);
    - only the height: a square image, width = height, whatever the model's own aspect;
    - only the width: the model's own height.

    The VAE factor is ``vae_factor`` where given, else ``vae_config``'s (8 where neither is known).

    Example:
        >>> from atedm_compile.models import unet_config
        >>> sampling_size(unet_config("tiny"))
        (256, 256, 8)
        >>> sampling_size(unet_config("tiny"), 128)
        (128, 128, 8)
        >>> sampling_size(unet_config("tiny"), 128, own=(64, 192))
        (128, 128, 8)
        >>> sampling_size(unet_config("tiny"), None, 128, own=(64, 192))
        (64, 128, 8)
    """
    factor = vae_factor or vae_factor_of(vae_config)
    if height is None and width is None:
        height, width = own or own_size(unet_config, factor)
    elif height is None:
        height = own[0] if own else own_height(unet_config, factor)
    elif width is None:
        width = height
    check_image_size(height, width, unet_config, factor)
    return height, width, factor


def check_sampling_memory(unet_config: dict, vae_config: dict | None, height: int, width: int, vae_factor: int,
                          images: int, unet_batch: int | None = None, pruned: bool = True, precision: str = "fp32",
                          device: str = "cpu") -> None:
    """ValueError, with the numbers, when sampling ``images`` images of height x width px (a U-Net
    batch of ``unet_batch``, default 2 per image for guidance) cannot fit in ``device``'s memory."""
    unet_batch = 2 * images if unet_batch is None else unet_batch
    check_fits(sampling_bytes(unet_config, vae_config, images, unet_batch, height, width, vae_factor, pruned,
                              precision),
               str(device), f"sampling {images} image{'s' * (images > 1)} of {width}x{height} px")


def preflight(unet_config: dict, vae_config: dict | None, height: int | None, width: int | None, images: int, *,
              vae_factor: int | None = None, own: tuple[int, int] | None = None, unet_batch: int | None = None,
              pruned: bool = True, precision: str = "fp32", device: str = "cpu") -> tuple[int, int, int]:
    """``sampling_size`` then ``check_sampling_memory``: the checks before a command samples, before
    any weights are loaded where the configs are known. Returns (height, width, VAE factor)."""
    height, width, factor = sampling_size(unet_config, height, width, vae_factor=vae_factor, vae_config=vae_config,
                                          own=own)
    check_sampling_memory(unet_config, vae_config, height, width, factor, images, unet_batch, pruned, precision,
                          device)
    return height, width, factor
