"""One sampling-size rule (``sizes.sampling_size``): every command given the same model and
``--height`` samples the same image size."""

from pathlib import Path

import pytest
from PIL import Image

from atedm_compile.cli import main
from atedm_compile.models import unet_config
from atedm_compile.shapes import synthetic
from atedm_compile.sizes import preflight, sampling_size

TOY_METRICS = f"{Path(__file__).with_name('evaluate_toy_metrics.py')}:toy_metrics"
TINY = unet_config("tiny")  # sample_size 32; sizes are multiples of 32 px with the SD VAE's factor 8


def test_the_model_size_by_default_and_width_equal_to_a_given_height():
    assert sampling_size(TINY) == (256, 256, 8)
    assert sampling_size(TINY, 128) == (128, 128, 8)
    assert sampling_size(TINY, None, 128) == (256, 128, 8)
    assert sampling_size(TINY, 128, 64) == (128, 64, 8)
    assert sampling_size(TINY, vae_config={"block_out_channels": [32, 64, 64]}) == (128, 128, 4)
    assert sampling_size(TINY, vae_factor=2, vae_config={"block_out_channels": [32, 64, 64]}) == (64, 64, 2)


def test_a_non_square_model_keeps_its_aspect_only_where_no_size_is_given():
    wide = {**TINY, "sample_size": [32, 64]}
    assert sampling_size(wide) == (256, 512, 8)
    assert sampling_size(wide, 128) == (128, 128, 8)
    assert sampling_size(TINY, own=(64, 192)) == (64, 192, 8)  # run: the build's size
    assert sampling_size(TINY, 128, own=(64, 192)) == (128, 128, 8)
    assert sampling_size(TINY, None, 128, own=(64, 192)) == (64, 128, 8)


def test_bad_sizes_and_sizes_that_cannot_fit_are_refused_with_the_size():
    with pytest.raises(ValueError, match="image size 72x72 px is not a positive multiple of 32 for this model"):
        sampling_size(TINY, 72)
    with pytest.raises(ValueError, match="sampling 1 image of 100000x100000 px needs at least"):
        preflight(TINY, None, 100000, None, images=1)
    assert preflight(TINY, None, 64, None, images=1) == (64, 64, 8)


@pytest.mark.slow
def test_generate_build_run_and_evaluate_sample_the_same_size(tmp_path):
    """tiny-shapes is made for 64x64 px; at --height 32 `build` used to keep the model's width (64)
    while the others made 32x32 images."""
    size = ["--model", "tiny-shapes", "--height", "32"]
    assert main(["generate", *size, "--steps", "1", "--out", str(tmp_path / "generate")]) == 0
    assert main(["build", *size, "--steps", "1", "--out", str(tmp_path / "build")]) == 0
    assert main(["run", str(tmp_path / "build"), "--out", str(tmp_path / "run.png")]) == 0
    images, _, captions, _ = synthetic.make_dataset(2, seed=5, size=64)  # FID needs two
    (tmp_path / "reference").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "reference" / f"{i}.png")
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
    assert main(["evaluate", *size, "--methods", "full", "--steps", "1", "--batch", "2", "--metrics", TOY_METRICS,
                 "--captions", str(tmp_path / "captions.txt"), "--reference", str(tmp_path / "reference"),
                 "--out", str(tmp_path / "evaluate")]) == 0
    written = [tmp_path / "generate" / "image.png", tmp_path / "run.png",
               *sorted((tmp_path / "evaluate" / "images").glob("*/*.png"))]
    assert len(written) == 4
    assert {path.name: Image.open(path).size for path in written} == {path.name: (32, 32) for path in written}
