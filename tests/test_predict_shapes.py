"""The array shapes predict() takes, one image or a batch, grey or colour, and the ones it refuses (issue 19, bug 7)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model import CNN, predict


def drawing(digit_box=(20, 10, 44, 54)) -> np.ndarray:
    """A 64x64 grey picture: a dark stroke on light paper."""
    image = Image.new("L", (64, 64), 220)
    left, top, right, bottom = digit_box
    ImageDraw.Draw(image).line([(left, top), (right, top), (left + 6, bottom)], fill=30, width=5)
    return np.asarray(image)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CNN().eval()


@pytest.fixture(scope="module")
def pictures():
    """Three different grey pictures, (3, 64, 64) uint8."""
    return np.stack([drawing(), drawing((10, 8, 30, 50)), drawing((30, 20, 56, 60))])


def test_a_colour_batch_gives_one_answer_per_picture(model, pictures):
    """(N, H, W, 3) and (N, 3, H, W) colour batches give N answers, each that of the same picture in grey."""
    grey = predict(model, list(pictures))[1]
    channels_last = np.repeat(pictures[..., None], 3, axis=-1)  # (3, 64, 64, 3)
    assert torch.allclose(predict(model, channels_last)[1], grey)
    assert torch.allclose(predict(model, torch.from_numpy(channels_last).permute(0, 3, 1, 2))[1], grey)
    assert torch.allclose(predict(model, channels_last[:2])[1], grey[:2])


def test_one_image_in_each_layout_gives_one_answer(model, pictures):
    """One picture as (H, W), (H, W, 3), (H, W, 4), floats in [0, 1] or uint8, gives one answer, the same each time."""
    picture = pictures[0]
    expected = predict(model, [picture])[1]
    rgba = np.dstack([picture] * 3 + [np.full_like(picture, 255)])
    for form in (picture, np.dstack([picture] * 3), rgba, picture / 255.0, torch.from_numpy(picture)):
        assert torch.allclose(predict(model, form)[1], expected, atol=1e-5)


def test_grey_batches_give_one_answer_per_picture(model, pictures):
    """(N, H, W) with N not 3 or 4, and (N, 1, H, W) for any N, give N answers."""
    two = pictures[:2]
    expected = predict(model, list(two))[1]
    assert torch.allclose(predict(model, two)[1], expected)
    assert torch.allclose(predict(model, torch.from_numpy(pictures)[:, None])[1][:2], expected)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 64, 64), "cannot tell whether shape (3, 64, 64) is 3 grey images or one colour image"),
        ((4, 64, 64), "cannot tell whether shape (4, 64, 64) is 4 grey images"),
        ((2, 2, 64, 64), "predict() takes one image (H, W) or (H, W, C)"),
        ((64,), "not shape (64,)"),
        ((1, 2, 64, 64, 3), "not shape (1, 2, 64, 64, 3)"),
    ],
)
def test_other_shapes_are_refused_in_one_line(model, shape, message):
    """A shape that is not one image or a batch, or that could be either, raises ValueError in one line, naming it."""
    with pytest.raises(ValueError) as error:
        predict(model, torch.rand(shape))
    assert message in str(error.value) and "\n" not in str(error.value)
