import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from atedm_compile.shapes import synthetic
from atedm_compile.shapes.synthetic import Scene, detect, frechet_distance, parse_caption, psnr, score, ssim


def _drawn(shape: str, fill=(230, 20, 20), box=(8, 8, 28, 28), background=(255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def test_detector_reads_a_drawn_red_square():
    found = detect(_drawn("square"))
    assert (found.colour, found.shape, found.position) == ("red", "square", "top left")


@pytest.mark.parametrize("shape", synthetic.SHAPES)
def test_detector_reads_each_drawn_shape(shape):
    found = detect(_drawn(shape, fill=(30, 60, 230), box=(20, 38, 44, 62)))
    assert (found.colour, found.shape, found.position) == ("blue", shape, "bottom")


def test_detector_picks_the_largest_object():
    image = _drawn("circle", fill=(40, 170, 60), box=(30, 30, 60, 60))
    ImageDraw.Draw(image).rectangle((2, 2, 8, 8), fill=(230, 20, 20))
    assert detect(image).colour == "green"


def test_detector_finds_nothing_on_a_bare_background():
    image, _ = synthetic.render(Scene("square", "red", "small", "center", "checkered", "blue"))
    image = image.copy()
    first, _ = synthetic.background_pair("blue")
    image[:] = first
    assert detect(image) is None


def test_detector_reads_back_every_rendered_scene():
    images, masks, captions, scenes = synthetic.make_dataset(60, seed=3)
    for image, mask, caption, scene in zip(images, masks, captions, scenes):
        assert score(image, caption) == {"colour": True, "shape": True, "position": True}, caption
        found = detect(image)
        assert (found.mask & mask).sum() / mask.sum() > 0.8


def test_dataset_is_seeded():
    first = synthetic.make_dataset(8, seed=5)
    again = synthetic.make_dataset(8, seed=5)
    other = synthetic.make_dataset(8, seed=6)
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    assert not np.array_equal(first[0], other[0])


def test_mask_covers_the_object_colour():
    scene = Scene("circle", "yellow", "large", "right", "striped", "gray")
    image, mask = synthetic.render(scene)
    inside = image[mask].astype(int)
    assert np.abs(inside - synthetic.COLOURS["yellow"]).max(axis=1).mean() < 10
    assert 0.5 < mask.sum() / (math.pi * (0.22 * 64) ** 2) < 1.2


def test_parse_caption_inverts_caption():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = synthetic.sample_scene(rng)
        assert parse_caption(scene.caption) == scene
    assert parse_caption("a small red triangle at the top left on a striped blue background") == Scene(
        "triangle", "red", "small", "top left", "striped", "blue")
    with pytest.raises(ValueError):
        parse_caption("a photo of a corgi")


def test_identical_images_give_infinite_psnr_and_ssim_one():
    image, _ = synthetic.render(Scene("triangle", "green", "large", "center", "checkered", "red"))
    assert psnr(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == 1.0


def test_psnr_of_a_uniform_error():
    a = np.full((16, 16, 3), 100, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255))


def test_ssim_falls_with_noise():
    image, _ = synthetic.render(Scene("square", "blue", "large", "center", "striped", "white"))
    noise = np.random.default_rng(0).normal(0, 40, image.shape)
    noisy = np.clip(image + noise, 0, 255).astype(np.uint8)
    assert ssim(image, noisy) < 0.7 < ssim(image, np.clip(image + noise / 8, 0, 255).astype(np.uint8)) < 1


def test_frechet_distance():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 4))
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(features, features + 3) == pytest.approx(4 * 9, rel=1e-9)
    # S_b = 4 S_a: tr(S_a + 4 S_a - 2 (4 S_a^2)^(1/2)) = tr(S_a); the means differ by mu_a.
    mean, cov = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(features, 2 * features) == pytest.approx(mean @ mean + np.trace(cov), rel=1e-9)
