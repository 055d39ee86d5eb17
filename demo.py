"""Draw a digit in the browser and watch the network answer: a page and one JSON endpoint.

    python demo.py                                   # the latest run's best.pt, on http://127.0.0.1:8000
    python demo.py --checkpoint runs/cnn/best.pt --port 8080
    curl -F image=@photo.jpg http://127.0.0.1:8000/predict

The page (static/) sends the drawing pad, an uploaded or a dropped photo to POST /predict as the
multipart field `image`. Every image goes through the one path predict.py uses: digits.prepare_digit,
then model.predict. The answer is {"digit", "confidence", "probabilities", "prepared"}, where
`prepared` is the 28x28 digit the network saw, as a PNG data URL; POST /predict?inside=1 adds "inside",
every layer's output for the page's views of the network (see inside()). Bad input gets a 4xx with
{"error": "<one line>"}, a failure of the server's own gets a 500 of the same shape (its traceback goes
to stderr), and the server goes on serving. The limits (body size, time to send the headers and the body, bodies
held at once, requests waiting, images decoded at once) are the constants below; docs/demo.md says why each is
what it is.
"""

import argparse
import base64
import contextlib
import io
import os
import socket
import sys
import threading
import traceback
import warnings
from pathlib import Path

import anyio.to_thread
import h11  # uvicorn's own dependency: the HTTP/1.1 parser its protocol below runs on
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from config import Config, Parser, UserError, exit_script
from digits import NoDigit, prepare_digit, small_image
from model import OCCLUSION_STRIDE, OCCLUSION_WINDOW, layer_outputs, load_checkpoint, occlusion, predict
from rundir import describe_checkpoint, find_checkpoint

STATIC = Path(__file__).resolve().parent / "static"
MAX_BYTES = 10 * 2**20  # a phone photo is 2-8 MB; reading stops at this many bytes of body, whatever the headers say
QUEUE = 100  # requests that may wait for a turn to send their body; past that, 503 (docs/demo.md says why 100)
BODY_SECONDS = 30  # the whole body must arrive within this: 10 MB needs 2.8 Mbit/s; a trickle is cut off
HEADER_SECONDS = 20  # the headers, from the connection opening; a browser may open one seconds ahead of its request
DRAIN_BYTES = 4 * MAX_BYTES  # read and dropped after a refusal (see refuse), so that the client sees the answer


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a container's cpuset), not all the machine has."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# Requests worked on at once, one thread each: more than cores would only share the cores.
WORKERS = usable_cpus()
# Images held at full size at once (decoded, not yet shrunk to digits.WORK_SIZE), whatever the number of cores: one
# is up to digits.MAX_PIXELS (64 MP, 256 MB as RGBA), so this, not the cores, bounds the memory decoding takes.
# Only decoding waits for this; the cleaning and the forward pass run on every worker at once.
DECODES = 2
decoding = threading.BoundedSemaphore(DECODES)
# Requests that may hold a body at once: being received, waiting for a worker or being decoded. Each holds at
# most MAX_BYTES (1 MB of it in memory, the rest in a temporary file), so this bounds the memory; 4 per worker
# keep the workers fed while others upload. The rest wait unread (QUEUE).
BODIES = 4 * WORKERS


class TooLarge(Exception):
    """More than the limit of body bytes has arrived."""


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def refuse(request: Request, status: int, message: str, drain: bool = True) -> JSONResponse:
    """An error sent before the body was read to its end. A body that a Content-Length says ends within
    DRAIN_BYTES is read on and dropped by uvicorn after the answer, so that a client still sending gets the
    answer, not a reset connection; the connection of any other (chunked, longer, too slow) is closed."""
    length = request.headers.get("content-length", "")
    chunked = "transfer-encoding" in request.headers
    if drain and not chunked and length.isdigit() and int(length) <= DRAIN_BYTES:
        return error(status, message)
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


async def counted(chunks, limit: int):
    """The body's chunks as they arrive; raises TooLarge as soon as more than `limit` bytes have come, so at
    most the limit plus one chunk is ever read, whatever Content-Length or Transfer-Encoding claimed."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise TooLarge
        yield chunk


def data_url(digit) -> str:
    """A 28x28 uint8 digit as a PNG data URL, which an <img> shows as it is."""
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def flat(t: torch.Tensor, channels: int) -> list:
    """A tensor as one flat list per channel, rounded to 1e-6: JSON a third as long, far below what a view shows."""
    return t.reshape(channels, -1).numpy().round(6).tolist()


def inside(model, digit, best: int) -> dict:
    """Every layer's output on a uint8 digit (28, 28), for the page's views, by model.layer_outputs and
    model.occlusion: {model, logits, input_map, window, stride} and, for the CNN, conv1 (10 maps of 12x12),
    conv2 (20 of 4x4) and filters (conv1's 10 weights of 5x5); for the FCNN, hidden. Maps are flat, row by row."""
    pixels = torch.from_numpy(digit)
    layers = layer_outputs(model, pixels[None])
    view = {
        "model": "cnn" if "conv1" in layers else "fcnn",
        "logits": flat(layers["logits"], 1)[0],
        "input_map": flat(occlusion(model, pixels, best), 1)[0],
        "window": OCCLUSION_WINDOW,
        "stride": OCCLUSION_STRIDE,
    }
    if view["model"] == "cnn":
        filters = model.conv1.weight.detach().float().cpu()
        view |= {"conv1": flat(layers["conv1"], 10), "conv2": flat(layers["conv2"], 20), "filters": flat(filters, 10)}
    else:
        view["hidden"] = flat(layers["hidden"], 1)[0]
    return view


def classify(model, image, with_inside: bool = False) -> dict:
    """The answer for one encoded image (bytes or a file object), with the network's inside if asked.
    Raises ValueError (NoDigit when no ink stands out)."""
    with decoding:
        image = small_image(image)
    digit = prepare_digit(image)
    # Many threads may run this at once: an eval-mode forward under inference_mode only reads the weights.
    probs = predict(model, digit, prepare=False)[1][0].tolist()
    best = max(range(10), key=probs.__getitem__)
    answer = {"digit": best, "confidence": probs[best], "probabilities": probs, "prepared": data_url(digit)}
    if with_inside:
        answer["inside"] = inside(model, digit, best)
    return answer


def classify_inside(model, image) -> dict:
    """classify()'s answer with "inside": what POST /predict?inside=1 answers, for the page's views."""
    return classify(model, image, with_inside=True)


def create_app(
    model, max_bytes: int = MAX_BYTES, bodies: int = BODIES, queue: int = QUEUE, body_seconds: float = BODY_SECONDS
):
    """The web app around one model in eval mode: the page at /, the classifier at POST /predict."""
    app = FastAPI(title="MNIST demo", docs_url=None, redoc_url=None, openapi_url=None)
    holding = anyio.CapacityLimiter(bodies)  # a request waits here before its body is read
    workers = anyio.CapacityLimiter(WORKERS)  # and here, its body read, before it is decoded
    too_large = f"the request is over the {max_bytes // 2**20} MB limit; send a smaller image"

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # the router's own 404 and 405: JSON like ours
        message = f"{e.detail}: {request.method} {request.url.path}; the page is GET /, an image goes to POST /predict"
        return JSONResponse({"error": message}, status_code=e.status_code, headers=e.headers)

    @app.post("/predict")
    async def predict_endpoint(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):  # saves reading the start
            return refuse(request, 413, too_large)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return refuse(request, 400, "no image: send the picture as the multipart form field named image")
        if holding.statistics().tasks_waiting >= queue:
            return refuse(request, 503, f"the server is busy ({queue} requests are waiting); try again in a moment")
        async with holding:  # until here the body is unread: it waits in the kernel's buffers, not in this process
            try:
                with anyio.fail_after(body_seconds):
                    body = counted(request.stream(), max_bytes)
                    # the image goes to a spooled file: up to 1 MB in memory, the rest in the temporary folder
                    form = await MultiPartParser(request.headers, body, max_files=1, max_fields=10).parse()
            except TooLarge:
                return refuse(request, 413, too_large)
            except TimeoutError:
                return refuse(
                    request, 408, f"the image did not arrive within {body_seconds:g} s; try again", drain=False
                )
            except MultiPartException as e:  # a broken multipart body, or more than one file
                return refuse(
                    request, 400, f"{e.message}; send the image as multipart/form-data with a field named image"
                )
            except ClientDisconnect:  # the client is gone: nobody reads the answer
                return refuse(request, 400, "the upload was cut off", drain=False)
            try:
                image = form.get("image")
                if not isinstance(image, UploadFile):
                    return error(400, "no image: send the picture as the multipart form field named image")
                # prepare_digit is CPU work: off the event loop, so other requests are served meanwhile
                answer = classify_inside if request.query_params.get("inside") == "1" else classify
                return await anyio.to_thread.run_sync(answer, model, image.file, limiter=workers)
            except NoDigit as e:
                return error(422, str(e))
            except ValueError as e:
                return error(415, f"not a usable image: {e}")
            except Exception as e:  # a bug or a decoder's surprise: still JSON, so the page can show it, and logged
                traceback.print_exc(file=sys.stderr)
                return error(500, f"the server failed on this image ({type(e).__name__}); try another image")
            finally:
                await form.close()  # the uploaded file's spool

    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for a request's headers, which uvicorn has not (its keep-alive
    timeout ends only a connection that sends nothing after an answer): a connection whose request headers are not
    complete HEADER_SECONDS after it opened, or after the first byte of its next request, is closed. Without it, a
    client that sends half a request line and stops holds a socket, and one file descriptor, for ever."""

    header_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(HEADER_SECONDS, self.headers_too_late)

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in (the body has BODY_SECONDS of its own)
            self.stop_timer()
        elif self.header_timer is None:  # the first bytes of a next request on a kept-alive connection
            self.header_timer = self.loop.call_later(HEADER_SECONDS, self.headers_too_late)

    def connection_lost(self, exc):
        self.stop_timer()
        super().connection_lost(exc)

    def stop_timer(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_late(self):
        self.header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.transport.close()


def port(text: str) -> int:
    """--port's type: a TCP port, 0 to 65535."""
    if not (text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text} is not a port; pass a number from 1 to 65535, or 0 for any free one")
    return int(text)


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
    parser.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000; 0: any free port)")
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
    # Pillow warns about what it skips in a damaged file (a tag, a short read): the file's one line says enough
    warnings.filterwarnings("ignore", module="PIL")
    # One image is far too small to split across cores: requests run side by side instead, one thread each.
    torch.set_num_threads(1)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving the demo on http://{shown}:{port}  (Ctrl-C stops it)", flush=True)
    # h11, always: uvicorn would take httptools whenever it is installed (uvicorn[standard]), which parses otherwise
    # (it refuses a Content-Length beside chunked encoding) and has no header deadline here; one parser everywhere
    # is the one the tests check. Parsing costs microseconds of a request's milliseconds, so speed is no reason.
    server = uvicorn.Server(uvicorn.Config(create_app(model), http=Protocol, log_level="warning"))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn finishes the requests under way on Ctrl-C, then re-raises it
        server.run(sockets=[sock])
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    exit_script(main())
