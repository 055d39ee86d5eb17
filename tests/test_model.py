import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from config import UserError
from data import normalize
from model import CNN, FCNN, build_model, count_parameters, layer_outputs, occlusion, predict


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


class CNNBefore(nn.Module):
    """The CNN as it was before pooling and ReLU became modules: F.max_pool2d and F.relu in forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc = nn.Linear(320, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc(x.flatten(1))


def test_a_state_dict_saved_before_pooling_and_relu_were_modules_still_loads():
    """A CNN state_dict saved by the earlier class loads strictly and gives the same logits."""
    torch.manual_seed(0)
    before = CNNBefore().eval()
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    model = build_model("cnn")
    model.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))  # strict: same keys
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(model.eval()(x), before(x), atol=1e-6)


def random_digits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8))


def test_layer_outputs_are_pytorchs_relu_of_max_pool_of_conv():
    """layer_outputs gives conv1 and conv2 as relu(max_pool(conv(x))), and the logits predict() uses."""
    torch.manual_seed(0)
    model = build_model("cnn").eval()
    digits = random_digits(4)
    layers = layer_outputs(model, digits)
    x = normalize(digits)
    conv1 = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
    conv2 = F.relu(F.max_pool2d(F.conv2d(conv1, model.conv2.weight, model.conv2.bias), 2))
    assert set(layers) == {"conv1", "conv2", "logits"}
    assert layers["conv1"].shape == (4, 10, 12, 12) and layers["conv2"].shape == (4, 20, 4, 4)
    assert torch.allclose(layers["conv1"], conv1, atol=1e-5) and torch.allclose(layers["conv2"], conv2, atol=1e-5)
    assert torch.allclose(layers["logits"], F.linear(conv2.flatten(1), model.fc.weight, model.fc.bias), atol=1e-5)
    assert torch.allclose(layers["logits"].softmax(1), predict(model, digits, prepare=False)[1], atol=1e-6)


def test_layer_outputs_of_the_fcnn_are_its_hidden_layer_and_logits():
    """For the FCNN, layer_outputs gives relu(fc1(x)) (N, hidden) and the logits; it has no maps."""
    torch.manual_seed(0)
    model = build_model("fcnn", hidden=32).eval()
    digits = random_digits(2)
    layers = layer_outputs(model, digits)
    hidden = F.relu(F.linear(normalize(digits).flatten(1), model.fc1.weight, model.fc1.bias))
    assert set(layers) == {"hidden", "logits"} and layers["hidden"].shape == (2, 32)
    assert torch.allclose(layers["hidden"], hidden, atol=1e-5)
    assert torch.allclose(layers["logits"], model(normalize(digits)), atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "fcnn"])
def test_occlusion_is_captums(name):
    """occlusion() equals Captum's Occlusion, in pixel space with 0 (paper) as the baseline, window 4, stride 2."""
    captum = pytest.importorskip("captum.attr", reason="pip install -r requirements-dev.txt")
    torch.manual_seed(0)
    model = build_model(name).eval()
    digit = random_digits(1, seed=1)[0]
    target = 3
    pixels = (digit.float() / 255).reshape(1, 1, 28, 28)
    reference = captum.Occlusion(lambda p: model(normalize(p * 255).squeeze(1))).attribute(
        pixels, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), baselines=0, target=target
    )
    ours = occlusion(model, digit, target, window=4, stride=2)
    assert ours.shape == (28, 28) and ours.abs().max() > 0
    assert torch.allclose(ours, reference[0, 0], atol=1e-5)
