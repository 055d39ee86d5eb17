"""The demo page in a real headless Chromium: draw digits on #pad with the mouse, read #prediction[data-digit].

Without Chromium (`apt-get install -y chromium`) it skips, and fails in CI (conftest.missing_tool); .ci/run installs it.
"""

import io
import os

import httpx
import pytest
from PIL import Image

from conftest import missing_tool
from drawn_digits import ARGS, CHROMIUM, WAIT_MS, answer, draw, serve
from test_demo import pad_png

if not os.path.exists(CHROMIUM):
    missing_tool(f"no Chromium at {CHROMIUM}", "apt-get install -y chromium")
try:
    from playwright import sync_api
except ImportError:
    missing_tool("playwright is not installed", "pip install -r requirements-dev.txt")

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True, timeout=60_000)
        yield browser
        browser.close()


def open_page(browser, url, **context):
    page = browser.new_page(**context)
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


def served_page(browser, checkpoint):
    """Yield the page of a demo serving `checkpoint`; close the page and stop the server afterwards."""
    with serve(checkpoint) as url:
        page = open_page(browser, url)
        yield page
        page.close()


@pytest.fixture(scope="module")
def synthetic_page(browser, trained_run):
    """The page of a demo serving the small model trained on synthetic data: enough for the page's mechanics."""
    yield from served_page(browser, trained_run / "best.pt")


# --- the page's contract ---------------------------------------------------------------------


def test_drawing_shows_a_digit_and_clear_empties_it(synthetic_page):
    """A drawn stroke fills #prediction[data-digit], the bars and the 28x28 view; #clear empties them all."""
    page = synthetic_page
    page.click("#clear")
    assert page.get_attribute("#prediction", "data-digit") == ""
    box = page.locator("#pad").bounding_box()
    draw(page, [[(100, 60), (90, 230)]], box)
    digit = answer(page)
    assert digit in list("0123456789")
    assert page.text_content("#prediction") == digit
    shares = page.eval_on_selector_all("#bars li", "bars => bars.map(b => parseFloat(b.style.getPropertyValue('--p')))")
    assert len(shares) == 10 and abs(sum(shares) - 1) < 0.01 and shares.index(max(shares)) == int(digit)
    assert page.eval_on_selector("#prepared", "img => img.complete && img.naturalWidth") == 28
    page.click("#clear")
    assert page.get_attribute("#prediction", "data-digit") == ""
    assert page.text_content("#prediction") == "\u2013"  # the page's en dash for "no answer yet"
    assert page.eval_on_selector(
        "#pad", "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 0)"
    )


def test_live_answers_while_drawing_keep_one_request_in_flight(synthetic_page):
    """Mouse moves while the button is down ask the server as the stroke grows, never two requests at once."""
    page = synthetic_page
    page.click("#clear")
    page.evaluate("""() => {
        window.inflight = 0; window.most = 0; window.asked = 0;
        const fetch0 = window.fetch;
        window.fetch = async (...args) => {
            window.inflight++; window.asked++; window.most = Math.max(window.most, window.inflight);
            try { return await fetch0(...args); } finally { window.inflight--; }
        };
    }""")
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 60, box["y"] + 60)
    page.mouse.down()
    for i in range(DRAWINGS):
        page.mouse.move(box["x"] + 60 + 2.5 * i, box["y"] + 60 + 2.5 * i)
    page.wait_for_function("window.asked >= 2", timeout=WAIT_MS)  # answers arrive before the pen is lifted
    page.mouse.up()
    answer(page)
    assert page.evaluate("window.most") == 1


def test_upload_classifies_the_photo(synthetic_page, tmp_path):
    """A photo chosen through #upload is classified, with the answer the API gives for the same file."""
    page = synthetic_page
    page.click("#clear")
    photo = tmp_path / "seven.jpg"
    Image.open(io.BytesIO(pad_png("7", transparent=False))).convert("RGB").save(photo, quality=90)
    page.set_input_files("#upload", str(photo))
    digit = answer(page)
    with httpx.Client(base_url=page.url, timeout=60) as http:
        expected = http.post("/predict", files={"image": ("seven.jpg", photo.read_bytes())}).json()["digit"]
    assert digit == str(expected)
    assert page.text_content("#message") == ""


def test_a_photo_dropped_on_the_page_is_classified(synthetic_page):
    """A file dropped anywhere on the page is classified, with the answer the API gives for the same file."""
    page = synthetic_page
    page.click("#clear")
    data = pad_png("1", transparent=False)
    transfer = page.evaluate_handle(
        """bytes => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "one.png", { type: "image/png" }));
        return transfer;
    }""",
        list(data),
    )
    page.dispatch_event("h1", "drop", {"dataTransfer": transfer})
    digit = answer(page)
    with httpx.Client(base_url=page.url, timeout=60) as http:
        expected = http.post("/predict", files={"image": ("one.png", data)}).json()["digit"]
    assert digit == str(expected) and page.get_attribute("#prediction", "data-digit") == digit


def test_a_blank_photo_shows_the_reason_and_no_digit(synthetic_page, tmp_path):
    """An upload with no ink leaves data-digit empty and shows the server's one-line reason."""
    page = synthetic_page
    page.click("#clear")
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 255).save(blank)
    page.set_input_files("#upload", str(blank))
    assert answer(page) == ""
    assert "No digit found" in page.text_content("#message")


def test_an_answer_that_is_not_json_shows_the_status(synthetic_page, tmp_path):
    """A reply that is no JSON (a proxy's or a crashed server's page) shows its status, not a parse failure."""
    page = synthetic_page
    page.click("#clear")
    page.route("**/predict*", lambda route: route.fulfill(status=502, body="Bad Gateway", content_type="text/html"))
    try:
        photo = tmp_path / "seven.png"
        Image.new("L", (200, 200), 255).save(photo)
        page.set_input_files("#upload", str(photo))
        assert answer(page) == ""
        assert "The server answered 502" in page.text_content("#message")
    finally:
        page.unroute("**/predict*")


def test_a_large_photo_is_scaled_down_in_the_browser_before_it_is_sent(synthetic_page, tmp_path):
    """A photo over 2048 px on its long side is sent scaled to 2048 (a 12 MP phone photo would pass the 10 MB
    limit no more); one within it is sent as it is, byte for byte."""
    page = synthetic_page
    page.evaluate("""() => {
        const fetch0 = window.fetch;
        window.sent = null;
        window.fetch = async (url, options) => {
            const image = options.body.get("image");
            const bitmap = await createImageBitmap(image);
            window.sent = { size: image.size, width: bitmap.width, height: bitmap.height };
            return fetch0(url, options);
        };
    }""")
    seven = Image.open(io.BytesIO(pad_png("7", transparent=False))).convert("RGB")
    for size, name in (((4000, 3000), "phone.jpg"), ((2048, 1536), "edge.jpg"), ((600, 800), "small.jpg")):
        page.click("#clear")
        photo = tmp_path / name
        seven.resize(size).save(photo, quality=90)
        page.set_input_files("#upload", str(photo))
        assert answer(page) != "", page.text_content("#message")  # read, whatever the small model says
        sent = page.evaluate("window.sent")
        if max(size) > 2048:
            assert (sent["width"], sent["height"]) == (2048, 1536), sent
        else:
            assert sent == {"size": photo.stat().st_size, "width": size[0], "height": size[1]}
    page.reload()  # the page's own fetch again, for the tests after this one


def test_resizing_the_window_keeps_an_uploaded_photo_and_its_answer(synthetic_page, tmp_path):
    """A window resized after an upload still shows the photo on the pad beside its answer."""
    page = synthetic_page
    page.click("#clear")
    photo = tmp_path / "seven.png"
    photo.write_bytes(pad_png("7", transparent=False))
    page.set_input_files("#upload", str(photo))
    digit = answer(page)
    ink = "c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v !== 0)"
    page.wait_for_function(f"({ink})(document.getElementById('pad'))")  # the photo is drawn once it has decoded
    size = page.viewport_size
    width = page.locator("#pad").bounding_box()["width"]
    try:
        page.set_viewport_size({"width": 700, "height": 800})
        page.wait_for_function(f"document.getElementById('pad').getBoundingClientRect().width !== {width}")
        page.evaluate("() => new Promise(requestAnimationFrame)")  # the resize event has been handled
        assert page.eval_on_selector("#pad", ink)
        assert page.get_attribute("#prediction", "data-digit") == digit
    finally:
        page.set_viewport_size(size)


# Drawn digits: test_web_browser.py draws them on this page and on the static site's page, in one test,
# each drawing once per page.
DRAWINGS = 50  # 2-3 s each on this machine; benchmarks/demo_browser.py draws more


def test_phone_sized_screen_fits_without_sideways_scrolling(browser, synthetic_page):
    """On a 390x844 phone screen the page has no horizontal scroll and the pad is at least 300 px wide."""
    url = synthetic_page.url
    page = open_page(browser, url, viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.locator("#pad").bounding_box()["width"] >= 300
    finally:
        page.close()
