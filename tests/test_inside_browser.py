"""The views of the network's inside, on the served page and on the static page, in a real headless Chromium:
every map the page draws (conv1, conv2, the input map, the filters) and every logit is PyTorch's for the 28x28
digit the page shows (#prepared: the server's prepare_digit, or the static page's own prepare.js), within the
tolerances below. Skips without Chromium or onnxruntime-web, as test_demo_browser and test_web_browser do.
"""

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import test_demo_browser
from data import normalize
from drawn_digits import answer, draw
from model import build_model, load_checkpoint, save_checkpoint
from test_demo import pad_png
from test_demo_browser import served_page
from test_inside import captum_occlusion
from test_web_browser import static_page

browser = test_demo_browser.browser  # the fixture: one Chromium for this module's pages

# A map shows a value as a colour of 256 levels on its layer's scale (the layer's largest |value|, written on
# each canvas as data-scale): rounding is half a level, and one level (scale / 255) leaves room for float32 sums
# in another order (onnxruntime's, or the server's 1e-6 rounding). Numbers the page holds in full (each layer's
# scale, each logit's data-value) are held to TOLERANCE.
LEVEL = 1 / 255
TOLERANCE = 1e-4
SIGNED = {"conv1": False, "conv2": False, "hidden": False, "input-map": True, "filters": True}

READ = """() => ({
  digit: document.getElementById("prediction").dataset.digit,
  prepared: document.getElementById("prepared").src,
  maps: [...document.querySelectorAll("#views canvas")].map((c) => ({
    layer: c.dataset.layer, channel: Number(c.dataset.channel), scale: Number(c.dataset.scale),
    width: c.width, height: c.height,
    rgba: Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data),
  })),
  logits: [...document.querySelectorAll('#views li[data-layer="logits"]')].map((li) => Number(li.dataset.value)),
})"""


def read_views(page) -> dict:
    """The page's answer: its digit, the 28x28 digit it shows, and each layer's maps decoded from their pixels,
    (channels, height, width), with the layer's scale."""
    seen = page.evaluate(READ)
    png = base64.b64decode(seen["prepared"].split(",", 1)[1])
    views = {"digit": int(seen["digit"]), "prepared": np.asarray(Image.open(io.BytesIO(png)).convert("L"))}
    for layer, signed in SIGNED.items():
        maps = sorted((m for m in seen["maps"] if m["layer"] == layer), key=lambda m: m["channel"])
        if not maps:
            continue
        assert [m["channel"] for m in maps] == list(range(len(maps)))
        assert len({m["scale"] for m in maps}) == 1, f"{layer}'s maps do not share one scale"
        rgba = np.array([m["rgba"] for m in maps], dtype=float).reshape(len(maps), maps[0]["height"], -1, 4)
        r, g, b = rgba[..., 0], rgba[..., 1], rgba[..., 2]
        if signed:  # red (255, 255 - a, 255 - a) above 0, blue (255 - a, 255 - a, 255) below, white at 0
            level = np.where(r == 255, 255 - g, -(255 - r))
        else:
            assert (r == g).all() and (g == b).all(), f"{layer}'s maps are not grey"
            level = r
        views[layer] = (level * maps[0]["scale"] / 255, maps[0]["scale"])
    views["logits"] = np.array(seen["logits"])
    return views


def references(model, digit: np.ndarray, best: int) -> dict:
    """PyTorch's own functions on the page's 28x28 digit: relu(max_pool(conv(x))) for each stage, the weights,
    Captum's Occlusion of the chosen digit's logit."""
    x = normalize(torch.from_numpy(digit.copy())[None])
    with torch.no_grad():
        if hasattr(model, "conv1"):
            conv1 = F.relu(F.max_pool2d(F.conv2d(x, model.conv1.weight, model.conv1.bias), 2))
            conv2 = F.relu(F.max_pool2d(F.conv2d(conv1, model.conv2.weight, model.conv2.bias), 2))
            logits = F.linear(conv2.flatten(1), model.fc.weight, model.fc.bias)
            layers = {"conv1": conv1[0], "conv2": conv2[0], "filters": model.conv1.weight[:, 0]}
        else:
            hidden = F.relu(F.linear(x.flatten(1), model.fc1.weight, model.fc1.bias))
            logits = F.linear(hidden, model.fc2.weight, model.fc2.bias)
            layers = {"hidden": hidden}
    layers = {name: value.detach().numpy() for name, value in layers.items()}
    layers["input-map"] = captum_occlusion(model, digit, best)[None]
    layers["logits"] = logits[0].numpy()
    return layers


def assert_views_are_pytorchs(page, model) -> dict:
    """Every map and logit of the page's views is PyTorch's for the page's own 28x28 digit; returns the views."""
    views = read_views(page)
    expected = references(model, views["prepared"], views["digit"])
    assert set(expected) == set(views) - {"digit", "prepared"}, "the views are not the model's layers"
    assert np.allclose(views["logits"], expected["logits"], atol=TOLERANCE)
    assert views["digit"] == expected["logits"].argmax()
    for layer in set(SIGNED) & set(expected):
        shown, scale = views[layer]
        reference = expected[layer].reshape(shown.shape)
        largest = np.abs(reference).max()
        assert np.isclose(scale, largest if largest else 1, atol=TOLERANCE)  # 1 when all are 0
        error = np.abs(shown - reference).max()
        assert error <= scale * LEVEL, f"{layer}: off by {error:.3g}, more than one level ({scale * LEVEL:.3g})"
    return views


@pytest.fixture(scope="module")
def model(trained_run):
    return load_checkpoint(trained_run / "best.pt")[0]


@pytest.fixture(scope="module", params=["served", "static"])
def page(request, browser, trained_run, tmp_path_factory):
    """The served page (python demo.py) and the static page (export.py --format web) of the same checkpoint."""
    if request.param == "served":
        yield from served_page(browser, trained_run / "best.pt")
    else:
        yield from static_page(browser, trained_run / "best.pt", tmp_path_factory.mktemp("site") / "web")


def draw_seven(page):
    page.click("#clear")
    draw(page, [[(60, 50), (220, 50), (120, 240)]], page.locator("#pad").bounding_box())
    assert answer(page) != "", page.text_content("#message")


def test_every_map_on_the_page_is_pytorchs(page, model):
    """conv1's 10 maps, conv2's 20, the filters, the input map and the logits are PyTorch's for the page's digit."""
    draw_seven(page)
    views = assert_views_are_pytorchs(page, model)
    assert views["conv1"][0].shape == (10, 12, 12) and views["conv2"][0].shape == (20, 4, 4)
    assert views["filters"][0].shape == (10, 5, 5) and views["input-map"][0].shape == (1, 28, 28)
    assert np.abs(views["conv1"][0]).max() > 0 and np.abs(views["input-map"][0]).max() > 0


def test_the_views_follow_the_drawing_and_clear_empties_them(page, model):
    """A further stroke repaints every map with the new digit's (still PyTorch's); Clear removes the maps."""
    draw_seven(page)
    before = read_views(page)
    draw(page, [[(70, 150), (200, 150)]], page.locator("#pad").bounding_box())
    answer(page)
    after = assert_views_are_pytorchs(page, model)
    assert not np.array_equal(before["conv1"][0], after["conv1"][0])
    page.click("#clear")
    assert page.eval_on_selector_all("#views canvas, #views li", "elements => elements.length") == 0


def test_each_view_says_what_it_shows_and_the_legend_says_what_light_and_dark_mean(page):
    """Every view has a sentence beside it; the legend names light, black, red and blue."""
    draw_seven(page)
    captions = page.eval_on_selector_all(
        "#views figure", "figures => figures.map(f => f.querySelector('figcaption').textContent)"
    )
    assert len(captions) == 5 and all(len(text.split()) >= 12 for text in captions)
    legend = page.text_content("#inside .legend")
    assert all(word in legend for word in ("light", "black", "Red", "blue"))
    assert page.get_attribute("#prediction", "data-digit") in list("0123456789")


def test_an_uploaded_photo_shows_its_maps_too(browser, trained_run, model):
    """On the served page a photo's views are PyTorch's for the digit the server prepared from it."""
    for page in served_page(browser, trained_run / "best.pt"):
        page.set_input_files("#upload", files=[{"name": "seven.png", "mimeType": "image/png", "buffer": pad_png("7")}])
        assert answer(page) != "", page.text_content("#message")
        assert_views_are_pytorchs(page, model)


@pytest.fixture(scope="module")
def fcnn_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fcnn") / "best.pt"
    save_checkpoint(
        {"model": build_model("fcnn", hidden=32).state_dict(), "model_name": "fcnn", "model_args": {"hidden": 32}}, path
    )
    return path


@pytest.mark.parametrize("where", ["served", "static"])
def test_the_fcnn_shows_its_hidden_layer_and_says_it_has_no_maps(browser, fcnn_checkpoint, tmp_path, where):
    """For the FCNN both pages say plainly that it has no feature maps, and show its hidden layer, PyTorch's."""
    model = load_checkpoint(fcnn_checkpoint)[0]
    pages = (
        served_page(browser, fcnn_checkpoint)
        if where == "served"
        else static_page(browser, fcnn_checkpoint, tmp_path / "web")
    )
    for page in pages:
        draw_seven(page)
        assert "no feature maps" in page.text_content("#views .no-maps")
        views = assert_views_are_pytorchs(page, model)
        assert "conv1" not in views and views["hidden"][0].size >= 32


def test_on_a_phone_the_views_open_by_keyboard_and_fit_the_width(browser, trained_run, model):
    """At 390 px the views start folded under the answer, neither asked for nor drawn; Tab reaches their summary,
    Enter opens them and they show the digit's maps; no view is wider than the screen; nothing is asked of another
    origin."""
    asked = []
    for page in served_page(browser, trained_run / "best.pt"):
        page.on("request", lambda request: asked.append(request.url))
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        draw_seven(page)
        assert page.evaluate("document.getElementById('inside').open") is False
        folded = [url for url in asked if "/predict" in url]
        assert folded and not any("inside=1" in url for url in folded), "folded views were asked for"
        assert page.eval_on_selector_all("#views canvas", "maps => maps.length") == 0
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.tagName") == "SUMMARY":
                break
        page.keyboard.press("Enter")
        assert page.evaluate("document.getElementById('inside').open") is True
        page.wait_for_selector('#views canvas[data-layer="conv1"][data-channel="9"]', state="visible")
        assert answer(page) != ""
        assert_views_are_pytorchs(page, model)  # asked for and drawn when opened
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        origin = page.url.rstrip("/")
        assert asked and all(url.startswith(origin + "/") or url.startswith("data:") for url in asked), asked
