"""The static site of `python export.py --format web` in a real headless Chromium, served as people serve a
site (python -m http.server, Debian's nginx, under a sub-path as GitHub Pages does): the page draws, prepares
the digit and runs the network with no Python behind it.

Without Chromium, onnxruntime-web (`npm ci`) or nginx, a test skips, naming the command, and fails in CI
(conftest.missing_tool).
"""

import base64
import contextlib
import functools
import http.server
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

import export
import test_demo_browser
from conftest import missing_tool, needs_real_data, serve_folder, serve_with
from drawn_digits import answer, draw, draw_digit, serve
from test_demo_browser import DRAWINGS, open_page
from test_web import needs_onnxruntime_web

# The largest difference, on 0-255, between a pixel of prepare.js's 28x28 digit and prepare_digit's for the same
# pad. The two compute the same steps in float32 and float64 in other orders; the thumbnail to 256 px resizes
# the RGBA pad in PIL but its grey values in prepare.js, which differ where a stroke's edge meets the paper.
PIXEL_TOLERANCE = 16

browser = test_demo_browser.browser  # the fixture: one Chromium for this module's pages


def export_site(checkpoint, folder):
    """`python export.py CHECKPOINT --format web --out FOLDER`, in this process (no second torch import)."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = export.main([str(checkpoint), "--format", "web", "--out", str(folder)])
    assert code == 0, err.getvalue()
    return out.getvalue()


def static_page(browser, checkpoint, folder):
    """Yield the static site of `checkpoint`, exported to `folder` and served, open in a page that logs every
    request in page.requests; close the page and stop the server afterwards."""
    needs_onnxruntime_web()
    export_site(checkpoint, folder)
    with serve_folder(folder) as url:
        page = open_page(browser, "about:blank")
        page.requests = []
        page.on("request", lambda request: page.requests.append(request))
        page.folder = folder
        page.goto(url)
        yield page
        page.close()


@pytest.fixture(scope="module")
def synthetic_site(browser, trained_run, tmp_path_factory):
    """The static site of the small model trained on synthetic data: enough for the page's mechanics."""
    yield from static_page(browser, trained_run / "best.pt", tmp_path_factory.mktemp("site") / "web")


def data(url: str) -> bytes:
    """The bytes of a data: URL, as the page's canvas.toDataURL() gives it."""
    return base64.b64decode(url.split(",", 1)[1])


def pixels(png: bytes) -> np.ndarray:
    """A PNG's pixels as int greyscale (0-255)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=int)


# --- the page's contract ---------------------------------------------------------------------


def test_the_page_says_it_runs_in_the_browser_and_reads_drawings_only(synthetic_site):
    """The page says where it runs; photos are not offered, and the page says that the served demo reads them."""
    page = synthetic_site
    assert "runs in your browser" in page.text_content("#where")
    assert not page.is_visible("#upload") and not page.is_visible(".upload-button")
    assert "python demo.py" in page.text_content("#photos")


def test_a_drawing_is_read_with_files_of_the_pages_own_folder_only(synthetic_site):
    """A drawing gets a digit, bars and the 28x28 view; every request goes to the page's own origin and asks
    for a file of the exported folder, and the page asks for every file of it."""
    page = synthetic_site
    page.click("#clear")
    draw(page, [[(100, 60), (90, 230)]], page.locator("#pad").bounding_box())
    digit = answer(page)
    assert digit in list("0123456789"), page.text_content("#message")
    shares = page.eval_on_selector_all("#bars li", "bars => bars.map(b => parseFloat(b.style.getPropertyValue('--p')))")
    assert abs(sum(shares) - 1) < 0.01 and shares.index(max(shares)) == int(digit)
    assert page.eval_on_selector("#prepared", "img => img.complete && img.naturalWidth") == 28
    origin = urlsplit(page.url)
    asked = [urlsplit(r.url) for r in page.requests if not r.url.startswith("data:")]
    assert {(u.scheme, u.netloc) for u in asked} == {(origin.scheme, origin.netloc)}, [r.url for r in page.requests]
    assert {r.method for r in page.requests} == {"GET"}
    files = {"index.html" if u.path == "/" else u.path.lstrip("/") for u in asked}
    assert files == {*export.SITE, export.MODEL_FILE, export.INSIDE_FILE}


def test_a_page_opened_as_a_file_says_to_serve_it(browser, synthetic_site):
    """Opened from file://, where WebAssembly and the model cannot load, the page says to serve the folder."""
    page = open_page(browser, (synthetic_site.folder / "index.html").as_uri())
    try:
        draw(page, [[(100, 60), (90, 230)]], page.locator("#pad").bounding_box())
        assert answer(page) == ""
        assert "python -m http.server" in page.text_content("#message")
    finally:
        page.close()


# --- the hosts people serve a site from ------------------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MIME_TYPES = Path("/etc/nginx/mime.types")  # the stock list: Debian 12's nginx 1.22 has no .mjs in it
SUB_PATH = "/repo/"  # as GitHub Pages serves a project's site: https://USER.github.io/REPO/


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def nginx(folder, timeout: float = 30):
    """Serve `folder` at SUB_PATH with this machine's nginx, configured as Debian's stock nginx.conf does (its
    mime.types, default_type application/octet-stream), on a free port of 127.0.0.1, from a temporary prefix;
    yield the site's URL, then stop nginx."""
    if not (os.path.exists(NGINX) and MIME_TYPES.is_file()):
        missing_tool(f"no nginx at {NGINX} with {MIME_TYPES}", "apt-get install -y nginx")
    with tempfile.TemporaryDirectory() as prefix:
        port = free_port()
        temp_paths = " ".join(f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi"))
        conf = f"""daemon off; master_process off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
            events {{ worker_connections 64; }}
            http {{
                include {MIME_TYPES}; default_type application/octet-stream; access_log off; {temp_paths}
                uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
                server {{ listen 127.0.0.1:{port}; location {SUB_PATH} {{ alias {Path(folder).resolve()}/; }} }}
            }}"""
        (Path(prefix) / "nginx.conf").write_text(conf)
        command = [NGINX, "-p", prefix, "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.05)
            else:
                log = Path(prefix, "error.log")
                raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else proc.returncode}")
            yield f"http://127.0.0.1:{port}{SUB_PATH}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def http_server(folder):
    """`python -m http.server` serving the folder that holds `folder`, so that the site is at a sub-path."""
    with serve_folder(Path(folder).parent) as url:
        yield f"{url}{Path(folder).name}/"


GLUE, WASM = "ort-wasm-simd-threaded.js", "ort-wasm-simd-threaded.wasm"  # onnxruntime-web's, which the worker loads


class Misconfigured(http.server.SimpleHTTPRequestHandler):
    """http.server's handler, but answering 404 for the files named in `missing` and sending those in `types` with
    the Content-Type given there, as a misconfigured host does."""

    def __init__(self, *args, missing=(), types=None, **kwargs):
        self.missing, self.types = missing, types or {}
        super().__init__(*args, **kwargs)

    def send_head(self):
        if urlsplit(self.path).path.rsplit("/", 1)[-1] in self.missing:
            self.send_error(404)
            return None
        return super().send_head()

    def guess_type(self, path):
        return self.types.get(Path(path).name) or super().guess_type(path)

    def log_message(self, *args):
        pass


def misconfigured(folder, missing=(), types=None):
    """Serve `folder` with the Misconfigured handler on a free port of 127.0.0.1, from a thread; yield its URL."""
    return serve_with(functools.partial(Misconfigured, directory=str(folder), missing=missing, types=types))


@pytest.mark.parametrize(
    "host",
    [nginx, http_server, functools.partial(misconfigured, types={WASM: "application/octet-stream"})],
    ids=["nginx", "http.server", "a host that knows no .wasm"],
)
def test_the_site_reads_a_drawing_where_people_host_it(browser, synthetic_site, host):
    """Served under a sub-path by Debian's nginx with its stock mime.types and by Python's http.server, and by a
    host that sends .wasm as application/octet-stream, the page loads onnxruntime-web and reads a drawn digit."""
    with host(synthetic_site.folder) as url:
        page = open_page(browser, url)
        try:
            draw(page, [[(100, 60), (90, 230)]], page.locator("#pad").bounding_box())
            assert answer(page) in list("0123456789"), page.text_content("#message")
        finally:
            page.close()


@pytest.mark.parametrize(
    "host, said",
    [({"missing": [GLUE]}, ["404", GLUE]), ({"types": {GLUE: "application/octet-stream"}}, [GLUE, "octet-stream"])],
    ids=["a file not on the host", "a script of another type"],
)
def test_a_host_that_fails_the_page_is_told_what_it_did_wrong(browser, synthetic_site, host, said):
    """When the host does not send a file that onnxruntime-web needs, or sends its glue script with a type that
    browsers do not run, the page's message names the file and what the server did."""
    assert GLUE in export.SITE
    with misconfigured(synthetic_site.folder, **host) as url:
        page = open_page(browser, url)
        try:
            draw(page, [[(100, 60), (90, 230)]], page.locator("#pad").bounding_box())
            assert answer(page) == ""
            message = page.text_content("#message")
            assert all(words in message for words in said), message
        finally:
            page.close()


# --- how well it reads drawn digits, against the served demo ---------------------------------


@pytest.fixture(scope="module")
def real_site(browser, real_run, tmp_path_factory):
    """The static site's page of a CNN trained on real MNIST, and `python demo.py` serving the same checkpoint
    (skips without the data)."""
    site = static_page(browser, real_run / "best.pt", tmp_path_factory.mktemp("real") / "web")
    with serve(real_run / "best.pt") as url, httpx.Client(base_url=url, timeout=60) as server:
        try:
            yield next(site), server
            next(site, None)  # close the page and stop the static server
        finally:
            site.close()


# The 50 drawings in chunks of ten: each test's own work stays well inside the per-test limit on a busy machine,
# and the last test judges all of them together. DRAWN holds each chunk's (static, served, largest pixel difference).
CHUNK = 10
DRAWN: dict[int, list[tuple[str, str, int]]] = {}


@pytest.mark.parametrize("chunk", range(DRAWINGS // CHUNK))
def test_drawn_digits_on_the_static_page_are_prepared_as_prepare_digit_prepares_them(real_site, chunk):
    """Ten digits drawn with the mouse, varied in size, place, slant and stroke width, on the static page; the same
    pad, as the demo's page sends it, posted to the served demo: prepare.js's 28x28 digit matches prepare_digit's
    to PIXEL_TOLERANCE on every drawing."""
    page, server = real_site
    rng = np.random.default_rng(chunk)
    DRAWN[chunk] = []
    for i in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        page.click("#clear")
        static = draw_digit(page, i % 10, rng)
        pad = data(page.evaluate("document.getElementById('pad').toDataURL('image/png')"))  # what the demo's page sends
        served = server.post("/predict", files={"image": ("pad.png", pad)}).json()
        mine, theirs = (pixels(data(url)) for url in (page.get_attribute("#prepared", "src"), served["prepared"]))
        DRAWN[chunk].append((static, str(served["digit"]), int(np.abs(mine - theirs).max())))
    assert max(worst for *_, worst in DRAWN[chunk]) <= PIXEL_TOLERANCE, DRAWN[chunk]


@needs_real_data  # as the chunks it judges skip without real MNIST (real_run)
def test_drawn_digits_are_read_alike_in_the_browser_and_by_the_served_demo():
    """Of the 50 drawings above, the static page reads >= 95% right, the served demo >= 95%, and the two give the
    same digit for >= 98%."""
    assert sorted(DRAWN) == list(range(DRAWINGS // CHUNK)), "a chunk of drawings above did not run to its end"
    rows = [row for chunk in sorted(DRAWN) for row in DRAWN[chunk]]  # in the order drawn: digit i is i % 10
    drawn = [(str(i % 10), static, served) for i, (static, served, _) in enumerate(rows)]
    right = {name: np.mean([row[0] == row[k] for row in drawn]) for k, name in ((1, "static"), (2, "served"))}
    same = np.mean([static == served for _, static, served in drawn])
    print(f"\nread right of {len(drawn)}: {right}; the two agree on {same:.0%}")
    assert right["static"] >= 0.95 and right["served"] >= 0.95, drawn
    assert same >= 0.98, drawn
