"""POST /predict?inside=1: every layer's output for the pages' views of the network, held to PyTorch's own
functions (relu(max_pool(conv(x))), the weights, Captum's Occlusion) on the digit prepare_digit made."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import demo
from data import normalize
from digits import prepare_digit
from model import OCCLUSION_STRIDE, OCCLUSION_WINDOW, build_model, load_checkpoint
from test_demo import TestClient, pad_png  # imported there without starlette's httpx warning

TOLERANCE = 1e-5  # float32 in another order, and the answer's rounding to 1e-6


def captum_occlusion(model, digit: np.ndarray, target: int) -> np.ndarray:
    """Captum's Occlusion of `target`'s logit on [0, 1] pixels (0 is paper), with the pages' window and stride."""
    from captum.attr import Occlusion

    pixels = torch.tensor(digit, dtype=torch.float32).reshape(1, 1, 28, 28) / 255  # a copy: the digit may be read-only
    window, stride = (1, OCCLUSION_WINDOW, OCCLUSION_WINDOW), (1, OCCLUSION_STRIDE, OCCLUSION_STRIDE)
    with torch.no_grad():
        attribution = Occlusion(lambda p: model(normalize(p * 255).squeeze(1))).attribute(
            pixels, sliding_window_shapes=window, strides=stride, baselines=0, target=target
        )
    return attribution[0, 0].numpy()


def ask(model, data: bytes, query: str = "?inside=1") -> dict:
    with TestClient(demo.create_app(model)) as client:
        response = client.post(f"/predict{query}", files={"image": ("pad.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def model(trained_run):
    return load_checkpoint(trained_run / "best.pt")[0]


def test_every_cnn_map_is_pytorchs_on_the_prepared_digit(model):
    """conv1, conv2, logits, filters and the input map are relu(max_pool(conv(x))), the weights and Captum's."""
    data = pad_png("7")
    answer = ask(model, data)
    inside = answer["inside"]
    digit = prepare_digit(data)
    x = normalize(torch.from_numpy(digit)[None])
    with torch.no_grad():
        conv1 = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
        conv2 = F.relu(F.max_pool2d(F.conv2d(conv1, model.conv2.weight, model.conv2.bias), 2))
        logits = model.fc(conv2.flatten(1))
    assert inside["model"] == "cnn" and (inside["window"], inside["stride"]) == (OCCLUSION_WINDOW, OCCLUSION_STRIDE)
    assert np.array(inside["conv1"]).shape == (10, 144) and np.array(inside["conv2"]).shape == (20, 16)
    assert np.allclose(inside["conv1"], conv1.reshape(10, 144), atol=TOLERANCE)
    assert np.allclose(inside["conv2"], conv2.reshape(20, 16), atol=TOLERANCE)
    assert np.allclose(inside["logits"], logits[0], atol=TOLERANCE)
    assert np.allclose(np.exp(inside["logits"]) / np.exp(inside["logits"]).sum(), answer["probabilities"], atol=1e-5)
    assert np.allclose(inside["filters"], model.conv1.weight.detach().reshape(10, 25), atol=TOLERANCE)
    occlusion = captum_occlusion(model, digit, answer["digit"])
    assert np.abs(occlusion).max() > 0
    assert np.allclose(np.reshape(inside["input_map"], (28, 28)), occlusion, atol=TOLERANCE)


def test_the_fcnn_answers_its_hidden_layer_and_no_maps():
    """For the FCNN, inside holds its hidden layer (relu(fc1(x))), logits and input map, and no conv maps or filters."""
    torch.manual_seed(0)
    model = build_model("fcnn", hidden=32).eval()
    data = pad_png("7")
    answer = ask(model, data)
    inside = answer["inside"]
    x = normalize(torch.from_numpy(prepare_digit(data))[None])
    with torch.no_grad():
        hidden = F.relu(model.fc1(x.flatten(1)))[0]
    assert inside["model"] == "fcnn" and not {"conv1", "conv2", "filters"} & set(inside)
    assert np.allclose(inside["hidden"], hidden, atol=TOLERANCE)
    occlusion = captum_occlusion(model, prepare_digit(data), answer["digit"])
    assert np.allclose(np.reshape(inside["input_map"], (28, 28)), occlusion, atol=TOLERANCE)


def test_inside_is_only_sent_when_asked(model):
    """Without ?inside=1 the answer stays the four fields curl users know; with it, the same four and inside."""
    data = pad_png("1")
    plain, full = ask(model, data, ""), ask(model, data)
    assert set(plain) == {"digit", "confidence", "probabilities", "prepared"}
    assert set(full) == set(plain) | {"inside"} and full["digit"] == plain["digit"]
