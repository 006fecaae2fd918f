"""The build the export tests share (made once per session by ``conftest.built``): the tiny
SD-XL U-Net, ``atedm`` preset, 4 steps (phases prune-less at step 0, pruned at steps 1-3)."""

from atedm_compile.export import BuildConfig

STEPS = 4
CONFIG = BuildConfig(model="tiny", schedule="atedm", num_steps=STEPS)
