"""The build the export tests share (made once per session by ``conftest.built``): the tiny
SD-XL U-Net, ``atedm`` preset, 4 steps (phases prune-less at step 0, pruned at steps 1-3)."""

from atedm_compile.export import BuildConfig

STEPS = 4
CONFIG = BuildConfig(model="tiny", schedule="atedm", num_steps=STEPS)


def pytorch_latent(unet, feed):
    """The PyTorch U-Net's output for an exported phase's named inputs (``example_inputs``), in
    the U-Net's own dtype."""
    import torch

    dtype = next(unet.parameters()).dtype
    x = {name: value.to(dtype) if value.is_floating_point() else value for name, value in feed.items()}
    with torch.no_grad():
        return unet(x["sample"], x["timestep"], x["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
