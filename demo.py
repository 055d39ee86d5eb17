"""Draw a digit in the browser and watch the network answer: a page and one JSON endpoint.

    python demo.py                                   # the latest run's best.pt, on http://127.0.0.1:8000
    python demo.py --checkpoint runs/cnn/best.pt --port 8080
    curl -F image=@photo.jpg http://127.0.0.1:8000/predict

The page (static/) sends the drawing pad, an uploaded or a dropped photo to POST /predict as the
multipart field `image`. Every image goes through the one path predict.py uses: digits.prepare_digit,
then model.predict. The answer is {"digit", "confidence", "probabilities", "prepared"}, where
`prepared` is the 28x28 digit the network saw, as a PNG data URL. Bad input gets a 4xx with
{"error": "<one line>"}, a failure of the server's own gets a 500 of the same shape (its traceback goes
to stderr), and the server goes on serving.
"""

import base64
import contextlib
import io
import os
import socket
import sys
import traceback
from pathlib import Path

import anyio.to_thread
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from config import Config, Parser, UserError
from digits import NoDigit, prepare_digit
from model import load_checkpoint, predict
from rundir import describe_checkpoint, find_checkpoint

STATIC = Path(__file__).resolve().parent / "static"
MAX_BYTES = 10 * 2**20  # a phone photo is 2-8 MB; a larger body is refused by its length, before it is read
# Images decoded at once. One is up to digits.MAX_PIXELS (64 MP: ~256 MB as RGBA, plus copies), and the server
# takes up to 40 requests at a time; more decodes than cores only share the cores and multiply the memory.
WORKERS = os.cpu_count() or 1


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def data_url(digit) -> str:
    """A 28x28 uint8 digit as a PNG data URL, which an <img> shows as it is."""
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def classify(model, data: bytes) -> dict:
    """The answer for one encoded image. Raises ValueError (NoDigit when no ink stands out)."""
    digit = prepare_digit(data)
    # Many threads may run this at once: an eval-mode forward under inference_mode only reads the weights.
    probs = predict(model, digit, prepare=False)[1][0].tolist()
    best = max(range(10), key=probs.__getitem__)
    return {"digit": best, "confidence": probs[best], "probabilities": probs, "prepared": data_url(digit)}


def create_app(model, max_bytes: int = MAX_BYTES):
    """The web app around one model in eval mode: the page at /, the classifier at POST /predict."""
    app = FastAPI(title="MNIST demo", docs_url=None, redoc_url=None, openapi_url=None)
    limiter = anyio.CapacityLimiter(WORKERS)  # the other requests wait here, their bodies read but not decoded

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "send the image with a Content-Length, as a multipart form field named image")
        if not length.isdigit() or int(length) > max_bytes:
            return error(413, f"the request is over the {max_bytes // 2**20} MB limit; send a smaller image")
        try:
            async with request.form(max_files=1, max_fields=10) as form:  # closes the uploaded file's spool
                image = form.get("image")
                if not isinstance(image, UploadFile):
                    return error(400, "no image: send the picture as the multipart form field named image")
                data = await image.read()
        except HTTPException as e:  # a broken multipart body, or more than one file
            return error(400, f"{e.detail}; send the image as multipart/form-data with a field named image")
        try:  # prepare_digit is CPU work: off the event loop, so other requests are served meanwhile
            return await anyio.to_thread.run_sync(classify, model, data, limiter=limiter)
        except NoDigit as e:
            return error(422, str(e))
        except ValueError as e:
            return error(415, f"not a usable image: {e}")
        except Exception as e:  # a bug or a decoder's surprise: still JSON, so the page can show it, and logged
            traceback.print_exc(file=sys.stderr)
            return error(500, f"the server failed on this image ({type(e).__name__}); try another image")

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a best.pt or last.pt, a run folder, or a run name in runs/ (default: the latest run's best.pt)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    return parser.parse_args(argv)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so that a port in use is one clear line rather than a server's log."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"cannot listen on {host}: {reason}; pass --host 127.0.0.1 or another address") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from here on, connections wait in the queue until uvicorn takes them
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); stop what uses it or pass another --port"
        ) from None
    return sock


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        checkpoint = find_checkpoint(args.checkpoint, Config().out_dir)
        model, ckpt = load_checkpoint(checkpoint)
        sock = listen(args.host, args.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_checkpoint(checkpoint, ckpt), file=sys.stderr, flush=True)
    # One image is far too small to split across cores: requests run side by side instead, one thread each.
    torch.set_num_threads(1)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving the demo on http://{shown}:{port}  (Ctrl-C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(model), log_level="warning"))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn finishes the requests under way on Ctrl-C, then re-raises it
        server.run(sockets=[sock])
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
