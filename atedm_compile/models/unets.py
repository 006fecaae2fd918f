"""A U-Net with random weights from a config: on the CPU, on the meta device (no memory: FLOPs), or
drawn where it lives on an accelerator."""

from __future__ import annotations

import torch


def unet_from_config(
    config: dict,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``UNet2DConditionModel`` of ``config``, randomly initialised, in ``dtype`` (``build_unet``
    takes a model's name as well).

    On ``device="meta"`` no memory is allocated: enough for FLOPs counting. On an accelerator the
    model is built on the meta device and its weights are drawn where they live (no host copy:
    SD-XL's are 10 GB in float32); the draw differs from the CPU's for the same seed.
    """
    from diffusers import UNet2DConditionModel

    from ..devices import cast

    # A model's saved config lists the keys it left at their defaults (_use_default_values);
    # drop such private keys so that every value given here is honoured.
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    device = torch.device(device)
    on_host = device.type in ("cpu", "meta")
    torch.manual_seed(seed)
    with torch.device(device if on_host else "meta"):
        unet = UNet2DConditionModel.from_config(config)
    if not on_host:
        initialise_on(unet, device, dtype, seed)
    elif dtype != torch.float32:
        cast(unet, dtype=dtype)
    return unet.eval().requires_grad_(False)


def initialise_on(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Give a model built on the meta device storage on ``device`` in ``dtype`` and draw its
    weights there with each layer's own initialisation (``reset_parameters``)."""
    from ..devices import cast

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    missing = sorted({type(m).__name__ for m in owners if not hasattr(m, "reset_parameters")})
    if missing or any(True for _ in model.buffers()):
        raise NotImplementedError(f"cannot initialise {type(model).__name__} on {device}: "
                                  f"{missing or 'buffers'} have no reset_parameters")
    cast(model, dtype=dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in owners:
            module.reset_parameters()
