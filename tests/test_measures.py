import numpy as np
import pytest
import torch

from atedm_compile.shapes import measures, synthetic
from atedm_compile.models import tiny_tokenizer


def test_token_coverage_is_the_object_share_of_each_token():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True  # top-left token of a 2 x 2 grid: fully covered
    mask[4, 4] = True      # one pixel of the bottom-right token (1 / 16 of it)
    coverage = measures.token_coverage(mask, (2, 2))
    np.testing.assert_allclose(coverage, [1.0, 0.0, 0.0, 1 / 16])


def test_token_coverage_rejects_a_grid_that_does_not_divide_the_mask():
    with pytest.raises(ValueError, match="does not split into a 3x3 token grid"):
        measures.token_coverage(np.zeros((8, 8), bool), (3, 3))


def test_kept_share_inside_outside_and_mixed():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # tokens 0, 1, 4, 5 of the 4 x 4 grid
    coverage = measures.token_coverage(mask, (4, 4))
    assert measures.kept_share(np.array([0, 1, 4, 5]), coverage) == 1.0
    assert measures.kept_share(np.array([2, 3, 15]), coverage) == 0.0
    assert measures.kept_share(np.array([0, 15]), coverage) == 0.5
    assert coverage.mean() == 0.25


def test_kept_share_rejects_bad_indices():
    coverage = np.zeros(16)
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        measures.kept_share(np.array([3, 16]), coverage)
    with pytest.raises(ValueError, match="no kept tokens"):
        measures.kept_share(np.array([], int), coverage)


def test_classifier_learns_the_synthetic_attributes():
    torch.manual_seed(0)
    model, accuracy = measures.train_classifier(count=400, steps=120, batch=32, progress=False)
    assert set(accuracy) == set(measures.ATTRIBUTES)
    # A quick training: colour and background are easy, well above chance (1/4 and 1/6).
    assert accuracy["colour"] > 0.6 and accuracy["background"] > 0.5
    images, _, _, _ = synthetic.make_dataset(5, seed=9)
    features = measures.features(model, images)
    assert features.shape == (5, 64) and np.isfinite(features).all()


def test_classifier_refuses_another_image_size():
    model = measures.ShapeClassifier()
    with pytest.raises(ValueError, match="reads 64 x 64"):
        model.features(torch.zeros(1, 3, 32, 32))


def test_tokenizer_makes_each_vocabulary_word_one_token():
    tokenizer = tiny_tokenizer(synthetic.VOCABULARY)
    caption = "a small red triangle at the top left on a checkered blue background"
    assert tokenizer.tokenize(caption) == [w + "</w>" for w in caption.split()]
    # Other text still tokenizes, byte by byte, and the byte-level ids are those of the plain tokenizer.
    plain = tiny_tokenizer()
    assert tokenizer.tokenize("xyz") == plain.tokenize("xyz")
    assert tokenizer("xyz").input_ids[1:-1] == plain("xyz").input_ids[1:-1]


def test_tokenizer_words_cover_every_caption():
    _, _, captions, _ = synthetic.make_dataset(50, seed=3)
    words = {w for caption in captions for w in caption.split()}
    assert words <= set(synthetic.VOCABULARY)
