import numpy as np
import pytest
import torch
from PIL import Image

from config import UserError
from model import CNN, FCNN, build_model, count_parameters, predict


def test_cnn_is_the_reference_network():
    """The CNN maps (B, 1, 28, 28) to (B, 10) logits with the post's 8,490 parameters."""
    model = CNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(model) == (1 * 25 + 1) * 10 + (10 * 25 + 1) * 20 + 320 * 10 + 10 == 8490


@pytest.mark.parametrize("hidden", [16, 256])
def test_fcnn_shapes_and_parameters(hidden):
    """The FCNN maps (B, 1, 28, 28) to (B, 10) with 784*h + h + 10*h + 10 parameters."""
    model = FCNN(hidden)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(model) == 784 * hidden + hidden + hidden * 10 + 10


def test_build_model_by_name():
    """build_model returns the class config.model names, and refuses unknown names in one line."""
    assert isinstance(build_model("cnn"), CNN)
    assert build_model("fcnn", hidden=32).fc1.out_features == 32
    with pytest.raises(UserError, match="unknown model 'vgg'; choose one of cnn, fcnn"):
        build_model("vgg")


def test_predict_accepts_every_image_form_alike():
    """Unprepared, PIL images, uint8 arrays, uint8 and [0, 1] float tensors, single or batched, predict alike."""
    torch.manual_seed(0)
    model = CNN().eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    classes, probs = predict(model, pixels, prepare=False)
    assert classes.shape == (4,) and probs.shape == (4, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4))
    assert torch.equal(classes, probs.argmax(dim=1))
    as_tensor = torch.from_numpy(pixels)
    for form in ([Image.fromarray(p) for p in pixels], as_tensor, as_tensor.float() / 255, as_tensor.unsqueeze(1)):
        assert torch.equal(predict(model, form, prepare=False)[0], classes)
    one_class, one_probs = predict(model, Image.fromarray(pixels[2]), prepare=False)
    assert one_class.shape == (1,) and torch.allclose(one_probs[0], probs[2], atol=1e-6)


def test_predict_rejects_wrong_shapes_and_types():
    """Unprepared, predict says which shapes and types it takes instead of failing deep inside the model."""
    model = CNN()
    with pytest.raises(ValueError, match=r"28x28 digits, one or a batch, not shape \(32, 32\)"):
        predict(model, np.zeros((32, 32), dtype=np.uint8), prepare=False)
    with pytest.raises(TypeError, match=r"not torch\.int64"):
        predict(model, torch.zeros(28, 28, dtype=torch.long), prepare=False)
