import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU under Triton's interpreter (tests/test_triton_map.py).
# Triton reads this when it is imported (diffusers may import it): set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from atedm_compile.models import build_unet, tiny_sdxl_pipeline

# Tiny models gain nothing from a second thread, and on a busy machine every parallel region
# would wait for a core: one thread keeps test times steady.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_unet():
    """The tiny SD-XL-topology U-Net (random weights). Tests must leave it as they found it."""
    return build_unet("tiny")


@pytest.fixture(scope="session")
def tiny_pipe():
    return tiny_sdxl_pipeline()


@pytest.fixture
def block_inputs():
    """Inputs of a level-2 block of the tiny U-Net: [B, 64, 16, 16] and text [B, 77, 64]."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 64, 16, 16, generator=generator), torch.randn(2, 77, 64, generator=generator)


@pytest.fixture
def level2_block(tiny_unet):
    return tiny_unet.down_blocks[1].attentions[0]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The export tests' build (``export_build.CONFIG``): (directory, manifest, step records).
    Tests that alter a build work on ``copy_of``."""
    from export_build import CONFIG

    from atedm_compile.export import build

    directory = tmp_path_factory.mktemp("export") / "tiny"
    manifest, records = build(CONFIG, directory, log=lambda _: None)
    return directory, manifest, records


@pytest.fixture
def copy_of(built, tmp_path):
    """A copy of the shared build, for a test to alter."""
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target
