"""demo.py: POST /predict through the framework's test client, and the real server as a user starts it."""

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

import demo
import predict as predict_cli
from conftest import call_main, one_line_error, run_cli
from digits import MAX_PIXELS, WORK_SIZE, load_image, prepare_digit
from drawn_digits import serve
from model import load_checkpoint, predict

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its test client; httpx works the same
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def pad_png(digit: str = "7", size: int = 280, transparent: bool = True) -> bytes:
    """What the page's pad sends: dark round strokes on a transparent (or white) square canvas, as PNG."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0) if transparent else "white")
    draw = ImageDraw.Draw(image)
    pen = size // 12
    paths = {"7": [(70, 60), (210, 60), (120, 230)], "1": [(140, 40), (135, 240)]}
    points = paths[digit]
    draw.line(points, fill=(29, 27, 46, 255), width=pen, joint="curve")
    for x, y in points:  # round caps, as the canvas draws them
        draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=(29, 27, 46, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height white pixels, with one row of data: decoding it would fail
    (or take gigabytes), so only a check of the header itself can give the pixel-limit error."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" + b"\xff" * width))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def model(trained_run):
    return load_checkpoint(trained_run / "best.pt")[0]


@pytest.fixture(scope="module")
def client(model):
    with TestClient(demo.create_app(model)) as client:
        yield client


def post(client, data: bytes, name="pad.png", field="image"):
    return client.post("/predict", files={field: (name, data, "image/png")})


# --- the answer ------------------------------------------------------------------------------


def test_answer_has_every_field_from_the_one_prepare_and_predict_path(client, model):
    """digit, confidence, probabilities and prepared are those of prepare_digit + model.predict on the same image."""
    data = pad_png("7")
    response = post(client, data)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert set(answer) == {"digit", "confidence", "probabilities", "prepared"}
    digit = prepare_digit(data)
    classes, probs = predict(model, digit, prepare=False)
    assert answer["digit"] == classes.item()
    assert np.allclose(answer["probabilities"], probs[0].tolist(), atol=1e-6)
    assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-4
    assert answer["confidence"] == max(answer["probabilities"]) == answer["probabilities"][answer["digit"]]
    head, encoded = answer["prepared"].split(",", 1)
    assert head == "data:image/png;base64"
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
    assert shown.shape == (28, 28) and np.array_equal(shown, digit)


def test_transparent_pad_reads_as_white_paper(client):
    """Strokes on the pad's transparent canvas give the 28x28 digit and answer they give on white paper."""

    def seen(answer):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["prepared"].split(",")[1])))).astype(int)

    clear, white = post(client, pad_png("1")).json(), post(client, pad_png("1", transparent=False)).json()
    # shrinking to prepare_digit's working size blends stroke edges with transparent black or with white:
    # one grey level apart
    assert np.abs(seen(clear) - seen(white)).max() <= 2
    assert clear["digit"] == white["digit"] and np.allclose(clear["probabilities"], white["probabilities"], atol=0.01)


def test_jpeg_upload_is_classified(client):
    """A JPEG photo, as curl -F image=@photo.jpg sends it, gets an answer like the PNG's."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(pad_png("7", transparent=False))).convert("RGB").save(buffer, format="JPEG", quality=85)
    response = client.post("/predict", files={"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200 and 0 <= response.json()["digit"] <= 9


def test_page_and_its_files_are_served_with_the_contract_ids(client):
    """/ serves the page with #pad, #prediction[data-digit], #clear and #upload; its script and style load locally."""
    page = client.get("/").text
    for needle in ('<canvas id="pad"', 'id="prediction" data-digit=""', 'id="clear"', 'type="file" id="upload"'):
        assert needle in page
    assert "http" not in page  # nothing from a CDN: the demo works offline
    assert client.get("/demo.js").status_code == client.get("/demo.css").status_code == 200


# --- bad input: a 4xx with one line, and the server goes on serving --------------------------


def assert_error(response, status: int, *words):
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert list(response.json()) == ["error"] and "\n" not in message and message
    for word in words:
        assert word in message


def test_not_an_image(client):
    """Bytes that are no image get 415 and say so."""
    assert_error(post(client, b"hello, not a picture", name="notes.txt"), 415, "not")


def test_every_documented_format_is_read(client):
    """The pad's drawing saved in each format that docs/demo.md and predict.py's help name gets the PNG's answer."""
    pad = Image.open(io.BytesIO(pad_png("7", transparent=False))).convert("RGB")
    expected = post(client, pad_png("7", transparent=False)).json()["digit"]
    for name in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        pad.save(buffer, format=name)
        response = post(client, buffer.getvalue(), name=f"pad.{name.lower()}")
        assert response.status_code == 200 and response.json()["digit"] == expected, (name, response.text)


def test_phone_sized_jpeg_is_decoded_small_with_the_same_digit(monkeypatch):
    """prepare_digit decodes a 12-megapixel JPEG in draft mode, at 1/4 scale (1000x750, still over twice its working
    size), and makes the digit that full decoding makes, to within a few grey levels."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(pad_png("7", transparent=False))).convert("RGB").resize((4000, 3000)).save(buffer, "JPEG")
    photo = buffer.getvalue()
    assert load_image(photo, draft=2 * WORK_SIZE).size == (1000, 750)
    assert load_image(photo).size == (4000, 3000)
    full = prepare_digit(load_image(photo)).astype(int)  # a decoded image: nothing left to draft
    sizes, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda *a: sizes.append(a[2]) or draft(*a))
    assert np.abs(prepare_digit(photo).astype(int) - full).mean() < 3
    assert sizes == [(2 * WORK_SIZE, 2 * WORK_SIZE)]


# An EPS that draws one vertical stroke: Pillow hands it to Ghostscript, a PostScript interpreter, to render.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath 50 10 moveto 50 90 lineto 10 setlinewidth stroke\n"


@pytest.mark.skipif(not shutil.which("gs"), reason="no Ghostscript (gs): Pillow cannot render an EPS here anyway")
def test_postscript_never_reaches_ghostscript(client, capsys, trained_run, tmp_path):
    """An EPS, which Pillow would render with Ghostscript here, gets 415 from the server and one error line from
    predict.py naming the formats that are read: only the raster formats in digits.FORMATS are opened."""
    assert Image.open(io.BytesIO(EPS)).convert("L").getextrema()[0] < 128  # the hole is real: gs draws the stroke
    assert_error(post(client, EPS, name="one.eps"), 415, "PNG, JPEG")
    path = tmp_path / "one.eps"
    path.write_bytes(EPS)
    result = call_main(capsys, predict_cli.main, [path, "--checkpoint", trained_run / "best.pt"])
    assert result.returncode == 1
    # The first line names the checkpoint predict.py uses; the one error line follows.
    assert result.stderr.strip().splitlines()[1:] == [f"error: {path}: not a PNG, JPEG, WEBP, GIF, BMP or TIFF image"]


def test_other_paths_and_methods_get_json_errors(client):
    """GET /predict, PUT /predict, an unknown page and POST / get their 404 or 405 as {"error": "<one line>"}, like
    every other error, saying where the page and the endpoint are."""
    for method, path, status in (("GET", "/predict", 404), ("PUT", "/predict", 405), ("GET", "/nope", 404)):
        assert_error(client.request(method, path), status, f"{method} {path}", "POST /predict")
    assert_error(client.post("/"), 405, "POST /")


def test_image_with_no_ink(client):
    """A blank pad gets 422: no digit found."""
    buffer = io.BytesIO()
    Image.new("RGBA", (280, 280), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert_error(post(client, buffer.getvalue()), 422, "no digit")


def test_no_image_field(client):
    """No field `image`, a body that is no form, a broken form or two files: 400 saying what to send."""
    assert_error(post(client, pad_png(), field="picture"), 400, "image")
    assert_error(client.post("/predict", data={"image": "text, not a file"}), 400, "image")
    assert_error(client.post("/predict", content=b"{}", headers={"content-type": "application/json"}), 400, "image")
    broken = {"content-type": "multipart/form-data; boundary=xyz"}
    nameless = b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name"
    assert_error(client.post("/predict", content=nameless, headers=broken), 400, "multipart/form-data")
    two = [("image", ("a.png", pad_png())), ("image", ("b.png", pad_png()))]
    assert_error(client.post("/predict", files=two), 400, "multipart/form-data")


def test_unexpected_failure_is_a_json_500_and_serving_goes_on(model, monkeypatch, capsys):
    """An exception classify does not expect still gets {"error": ...} (a 500), logged with its traceback; the next
    request is answered as usual."""
    real = demo.classify

    def broken(model, image):  # image: the uploaded file
        if image.read() == b"boom":
            raise RuntimeError("a decoder's surprise")
        image.seek(0)
        return real(model, image)

    monkeypatch.setattr(demo, "classify", broken)
    with TestClient(demo.create_app(model)) as fresh:
        assert_error(post(fresh, b"boom"), 500, "RuntimeError")
        assert "RuntimeError: a decoder's surprise" in capsys.readouterr().err
        assert post(fresh, pad_png()).status_code == 200


def test_at_most_workers_images_are_decoded_at_once(model, monkeypatch):
    """With 6 requests waiting, only demo.WORKERS run classify at once (more would only share the cores); all are
    answered."""
    monkeypatch.setattr(demo, "WORKERS", 2)
    lock, active, peak = threading.Lock(), [0], [0]
    two_in, too_many, release = threading.Event(), threading.Event(), threading.Event()

    def held(model, data):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                two_in.set()
            if active[0] > 2:
                too_many.set()
        release.wait(timeout=30)
        with lock:
            active[0] -= 1
        return {"digit": 0}

    monkeypatch.setattr(demo, "classify", held)
    with TestClient(demo.create_app(model)) as fresh, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, fresh, pad_png()) for _ in range(6)]
        try:
            assert two_in.wait(timeout=30)
            assert not too_many.wait(timeout=1)  # the four others stay queued while the two are held
        finally:
            release.set()
        assert [f.result(timeout=30).status_code for f in futures] == [200] * 6
    assert peak[0] == 2


def test_at_most_decodes_images_are_held_at_full_size_at_once(model, monkeypatch):
    """With 4 workers busy, only demo.DECODES of them decode an image at once (a full-size image may take 256 MB,
    and the number of cores must not multiply that); the others wait their turn and all are answered."""
    assert demo.DECODES < 4
    monkeypatch.setattr(demo, "WORKERS", 4)
    lock, active, peak = threading.Lock(), [0], [0]
    full, too_many, release = threading.Event(), threading.Event(), threading.Event()

    def decode(image):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == demo.DECODES:
                full.set()
            if active[0] > demo.DECODES:
                too_many.set()
        release.wait(timeout=30)
        with lock:
            active[0] -= 1
        return real(image)

    real = demo.small_image
    monkeypatch.setattr(demo, "small_image", decode)
    with TestClient(demo.create_app(model)) as fresh, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, fresh, pad_png()) for _ in range(6)]
        try:
            assert full.wait(timeout=30)
            assert not too_many.wait(timeout=1)  # two more workers are in classify, waiting to decode
        finally:
            release.set()
        assert [f.result(timeout=30).status_code for f in futures] == [200] * 6
    assert peak[0] == demo.DECODES


def test_body_over_the_size_limit(model):
    """A body over the limit gets 413, by its Content-Length; one under it is read and classified."""
    data = pad_png()
    with TestClient(demo.create_app(model, max_bytes=len(data) + 1000)) as small:
        assert post(small, data).status_code == 200
        assert_error(post(small, data + b"\0" * 2000), 413, "limit")


FORM = {"content-type": "multipart/form-data; boundary=x"}


def asgi_call(app, headers: dict) -> tuple[int, dict, int]:
    """POST /predict straight to the ASGI app; return (status, JSON body, how many times it asked for the body)."""
    reads, sent = [], []

    async def receive():  # an endless body: a file part that never ends
        reads.append(1)
        chunk = (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
            if len(reads) == 1
            else b"x" * 1024
        )
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), len(reads)


def test_oversized_body_is_refused_before_it_is_read(model):
    """A request announcing 1 GB is refused with 413 without reading any of its body."""
    status, body, reads = asgi_call(demo.create_app(model), {**FORM, "content-length": str(2**30)})
    assert (status, reads) == (413, 0) and "limit" in body["error"]


def test_body_without_length_is_counted_and_cut_off_at_the_limit(model):
    """An endless body with no Content-Length gets 413 once more than the limit has come: at most the limit plus one
    chunk is read (tests/test_demo_server.py sends such bodies to the real server)."""
    status, body, reads = asgi_call(demo.create_app(model, max_bytes=10 * 1024), FORM)
    assert (status, reads) == (413, 11) and "limit" in body["error"]


def test_pixel_bomb_is_refused_from_its_header(client):
    """A PNG claiming 60,000x60,000 pixels (and one just over MAX_PIXELS) gets 415 naming the limit, not a decode."""
    side = int(MAX_PIXELS**0.5) + 1
    for width, height in ((60_000, 60_000), (side, side)):
        data = huge_png(width, height)
        assert len(data) < 100_000
        assert_error(post(client, data), 415, "megapixel limit")
    assert post(client, pad_png()).status_code == 200  # and it goes on serving


def test_predict_py_refuses_the_pixel_bomb_too(capsys, trained_run, tmp_path):
    """predict.py gives the same one-line pixel-limit error for the bomb and still classifies the other file."""
    bomb, good = tmp_path / "bomb.png", tmp_path / "seven.png"
    bomb.write_bytes(huge_png(60_000, 60_000))
    good.write_bytes(pad_png())
    result = call_main(capsys, predict_cli.main, [bomb, good, "--checkpoint", trained_run / "best.pt"])
    assert result.returncode == 1
    expected = f"error: {bomb}: more than the 64-megapixel limit; scale the image down"
    assert result.stderr.strip().splitlines()[1:] == [expected]  # after the line naming the checkpoint
    assert result.stdout.startswith(f"{good}: ")


# --- the real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(trained_run):
    with serve(trained_run / "best.pt") as url:
        yield url


def test_forty_concurrent_requests_all_succeed_with_the_same_answer(server):
    """40 requests at once to the real server all get 200 and the answer each gets alone: the model is shared safely."""
    import httpx

    images = [pad_png("7"), pad_png("1"), pad_png("7", transparent=False), pad_png("1", transparent=False)]
    with httpx.Client(base_url=server, timeout=60) as http:
        alone = [http.post("/predict", files={"image": ("pad.png", data)}).json() for data in images]
        with ThreadPoolExecutor(40) as pool:
            barrier = threading.Barrier(40, timeout=30)

            def one(i):
                barrier.wait()  # all 40 start together
                return http.post("/predict", files={"image": ("pad.png", images[i % 4])})

            responses = list(pool.map(one, range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    for i, response in enumerate(responses):
        assert response.json()["digit"] == alone[i % 4]["digit"]
        assert np.allclose(response.json()["probabilities"], alone[i % 4]["probabilities"], atol=1e-5)


def test_default_checkpoint_is_the_latest_runs_best(trained_run, tmp_path):
    """Without --checkpoint, demo.py serves runs/<latest>/best.pt from where it is started, as predict.py does."""
    import httpx

    (tmp_path / "runs" / "mine").mkdir(parents=True)
    shutil.copy(trained_run / "best.pt", tmp_path / "runs" / "mine" / "best.pt")
    with serve(None, cwd=tmp_path) as url:
        served = httpx.post(url + "/predict", files={"image": ("pad.png", pad_png())}, timeout=60).json()
    model = load_checkpoint(trained_run / "best.pt")[0]
    expected = predict(model, prepare_digit(pad_png()), prepare=False)[1][0]
    assert np.allclose(served["probabilities"], expected, atol=1e-5)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_port_out_of_range_is_one_error_line(capsys, port):
    """--port outside 0-65535, or not a number: exit 2 with one `error:` line naming --port, not a traceback."""
    result = call_main(capsys, demo.main, ["--port", port])
    line = one_line_error(result)
    assert "--port" in line and port in line and "65535" in line


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True, reason="one CPU")
def test_workers_are_the_cpus_this_process_may_use():
    """demo.WORKERS counts the CPUs the process may run on (taskset, a container's cpuset), not the machine's."""
    allowed = os.sched_getaffinity(0)
    assert demo.WORKERS == demo.usable_cpus() == len(allowed)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # this thread only, as `taskset -c 0` would start the process
        assert demo.usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_missing_checkpoint_is_one_error_line(tmp_path):
    """A checkpoint that is not there: exit 2 with one `error:` line, no traceback, no server."""
    result = run_cli("demo.py", "--checkpoint", tmp_path / "nowhere.pt", "--port", "0", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no checkpoint at {tmp_path / 'nowhere.pt'}; train one with `python train.py` or check the path"
    ]


def test_port_in_use_is_one_error_line(trained_run):
    """A port another program holds: exit 2 with one `error:` line naming the port and --port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo.py", "--checkpoint", trained_run / "best.pt", "--port", port, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in lines[0]
