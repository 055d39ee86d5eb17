"""demo.py's limits where the bytes arrive: raw sockets against the real server process, as a client on the network
would send them (a lying length, a chunked body, a trickle, a body cut off, more uploads than it holds at once,
headers that never end)."""

import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import kill_all, start, stderr_of, wait_for_line
from test_demo import pad_png

BODIES, QUEUE, SECONDS = 2, 2, 5  # the server's limits here: few slots and a short deadline keep the tests short
HEADER_SECONDS = 2  # demo.HEADER_SECONDS here
TIMEOUT = 30  # on every socket: a server that stops answering fails the test, not the whole run
LIMIT = 10 * 2**20  # demo.MAX_BYTES, which the server keeps here
BOUNDARY = b"imageboundary"

# `python demo.py --port 0 --checkpoint ...` with the limits above. demo.py always parses HTTP with h11 (which
# accepts a Content-Length beside chunked encoding), even where httptools is installed.
LAUNCH = f"""
import functools, sys, demo
demo.create_app = functools.partial(demo.create_app, bodies={BODIES}, queue={QUEUE}, body_seconds={SECONDS})
demo.HEADER_SECONDS = {HEADER_SECONDS}
sys.exit(demo.main())
"""

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads socket queues from /proc/net/tcp")


@pytest.fixture(scope="module")
def server(trained_run):
    """The real server on a free port; at the end it must stop cleanly on Ctrl-C, with no traceback logged."""
    proc = start([sys.executable, "-u", "-c", LAUNCH, "--port", 0, "--checkpoint", trained_run / "best.pt"])
    try:
        line = wait_for_line(proc, "serving the demo on")[-1]
        proc.port = int(line.split()[4].rsplit(":", 1)[1])
        yield proc
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
        assert "Traceback" not in stderr_of(proc), stderr_of(proc)
    finally:
        if proc.poll() is None:
            kill_all(proc)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)


def form(data: bytes) -> bytes:
    """A multipart body with `data` as the file field `image`, as the page and curl -F send it."""
    part = b'Content-Disposition: form-data; name="image"; filename="pad.png"\r\nContent-Type: image/png\r\n\r\n'
    return b"--" + BOUNDARY + b"\r\n" + part + data + b"\r\n--" + BOUNDARY + b"--\r\n"


def head(*fields: str) -> bytes:
    lines = [
        "POST /predict HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}",
    ]
    return ("\r\n".join([*lines, *fields]) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int = 2**16):
    """The body in chunked transfer encoding, one chunk at a time, then the last chunk."""
    for i in range(0, len(body), size):
        yield b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
    yield b"0\r\n\r\n"


def answer(sock) -> tuple[int | None, bytes]:
    """The status and body of the response on sock, or (None, b"") when the server closed it without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            assert not data, data
            return None, b""
        data += more
    header, body = data.split(b"\r\n\r\n", 1)
    lines = header.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, "the connection closed inside the response"
        body += more
    return int(lines[0].split()[1]), body


def post(server, data: bytes) -> tuple[int | None, bytes]:
    """One whole, honest request for `data` on a new connection, and its answer."""
    body = form(data)
    with connect(server) as sock:
        sock.sendall(head(f"Content-Length: {len(body)}") + body)
        return answer(sock)


def unread(server, sock: socket.socket) -> int:
    """Bytes sock has sent that the server process has not read yet: in sock's send queue or in the server's
    receive queue, as /proc/net/tcp shows them (columns: local address, remote address, state, tx:rx queues)."""
    port = sock.getsockname()[1]
    total = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, _, queues = row.split()[1:5]
        tx, rx = (int(n, 16) for n in queues.split(":"))
        local_port, remote_port = (int(address.split(":")[1], 16) for address in (local, remote))
        if local_port == port and remote_port == server.port:
            total += tx
        elif local_port == server.port and remote_port == port:
            total += rx
    return total


def send_in_background(sock: socket.socket, pieces) -> dict:
    """Send the pieces on sock from a thread, while the test reads the answer; the dict says how many bytes went
    and the error that stopped the sending, if any. Joined before the test ends."""
    state = {"sent": 0, "error": None}

    def run():
        try:
            for piece in pieces:
                sock.sendall(piece)
                state["sent"] += len(piece)
        except OSError as e:  # the server closed the connection: what it has not read, it never will
            state["error"] = e

    state["thread"] = threading.Thread(target=run, daemon=True)
    state["thread"].start()
    return state


# --- the size limit holds on what arrives, not on what the headers say --------------------------


@pytest.mark.parametrize("framing", ["chunked", "lying"])
def test_body_over_the_limit_is_cut_off_where_it_arrives(server, framing):
    """A 100 MB chunked body, also under a false `Content-Length: 100`, gets 413 once 10 MB have come; the server
    stops reading there (the sender is cut off long before 100 MB) and goes on serving."""
    fields = ["Transfer-Encoding: chunked"] + (["Content-Length: 100"] if framing == "lying" else [])
    body = form(b"\0" * 100 * 2**20)
    with connect(server) as sock:
        sock.sendall(head(*fields))
        sending = send_in_background(sock, chunked(body))
        status, text = answer(sock)
        sending["thread"].join(timeout=TIMEOUT)
    assert status == 413 and b"10 MB limit" in text, (status, text)
    assert sending["error"] is not None and sending["sent"] < len(body) / 2, sending
    assert post(server, pad_png())[0] == 200


def test_photo_over_the_limit_with_its_length_gets_the_413_not_a_reset(server):
    """A 12 MB upload with an honest Content-Length gets 413 at once, and the server reads the rest and drops it, so
    the sender finishes and sees the answer rather than a reset connection (a browser would show the reset)."""
    body = form(b"\0" * 12 * 2**20)
    with connect(server) as sock:
        sending = send_in_background(sock, [head(f"Content-Length: {len(body)}"), body])
        status, text = answer(sock)
        sending["thread"].join(timeout=TIMEOUT)
    assert status == 413 and b"10 MB limit" in text, (status, text)
    assert sending["error"] is None and sending["sent"] > len(body), sending


def test_chunked_upload_under_the_limit_is_classified(server):
    """A chunked upload (no Content-Length) under the limit is read, counted, and answered like any other."""
    with connect(server) as sock:
        sock.sendall(head("Transfer-Encoding: chunked") + b"".join(chunked(form(pad_png()), size=1000)))
        status, text = answer(sock)
    assert status == 200 and b'"digit"' in text, text


# --- a body that does not come -------------------------------------------------------------------


def test_trickled_body_gets_408_at_the_deadline_while_others_are_served(server):
    """A body sent a byte at a time (slow-loris) is cut off with 408 after the deadline, not waited for; meanwhile
    the server answers other uploads at once."""
    body = form(pad_png())
    with connect(server) as sock:
        sock.sendall(head(f"Content-Length: {len(body)}"))
        start = time.monotonic()

        def slowly():  # a byte every 50 ms, for at most twice the deadline
            for byte in body[: SECONDS * 40]:
                yield bytes([byte])
                time.sleep(0.05)

        sending = send_in_background(sock, slowly())
        assert post(server, pad_png())[0] == 200
        status, text = answer(sock)
        waited = time.monotonic() - start
        sending["thread"].join(timeout=TIMEOUT)
    assert status == 408 and b"did not arrive" in text, (status, text)
    assert SECONDS - 0.5 < waited < SECONDS + 10


def test_body_cut_off_by_the_client_ends_quietly(server):
    """A body that ends before its Content-Length (the client closes its side) gets the connection closed, no
    traceback in the log, and the server goes on serving."""
    body = form(pad_png())
    with connect(server) as sock:
        sock.sendall(head(f"Content-Length: {len(body)}") + body[: len(body) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert answer(sock) == (None, b"")
    assert post(server, pad_png())[0] == 200
    assert "Traceback" not in stderr_of(server)


# --- how many bodies are held at once ------------------------------------------------------------


def test_requests_past_the_held_bodies_wait_unread_and_past_the_queue_get_503(server):
    """With BODIES uploads being received, the next QUEUE wait with their bodies unread, in the kernel's buffers,
    and the one after gets 503 at once; when the first ones finish, every waiting one is answered 200."""
    picture = pad_png() + b"\0" * 2**20  # a PNG reads to its end marker: the megabyte after it is ignored
    body = form(picture)
    request = head(f"Content-Length: {len(body)}") + body
    half = len(request) // 2
    received, waiting = [], []  # each connects just before it sends: its headers have HEADER_SECONDS to arrive
    try:
        for _ in range(BODIES):  # half a body each, which the server reads: it holds them
            sock = connect(server)
            received.append(sock)
            sending = send_in_background(sock, [request[:half]])
            deadline = time.monotonic() + SECONDS / 2  # then the server would cut it off
            while (sending["thread"].is_alive() or unread(server, sock)) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert unread(server, sock) == 0, "the server did not read a body while it held fewer than BODIES"
        waiting += [connect(server) for _ in range(QUEUE)]
        senders = [send_in_background(sock, [request]) for sock in waiting]
        time.sleep(0.3)  # time for the server to read them, if it would
        for sock in waiting:  # uvicorn reads up to 64 KB before the app asks; the rest stays in the kernel
            assert unread(server, sock) > 2**19, "a request past BODIES had its body read"
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # and is not answered
            sock.settimeout(TIMEOUT)
        status, text = post(server, pad_png())
        assert status == 503 and b"busy" in text, (status, text)
        for sock in received:
            sock.sendall(request[half:])
        assert [answer(sock)[0] for sock in received + waiting] == [200] * (BODIES + QUEUE)
        for sending in senders:
            sending["thread"].join(timeout=TIMEOUT)
    finally:
        for sock in received + waiting:
            sock.close()


# --- headers that do not come --------------------------------------------------------------------


def closed_by(socks: list[socket.socket], deadline: float) -> dict[socket.socket, float]:
    """When (time.monotonic()) the server closed each of socks, for those it closed by `deadline`."""
    closed = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(1024)
                except ConnectionResetError:
                    data = b""
                assert not data, data  # a half-sent request gets no answer: only the connection closed
                closed[key.fileobj] = time.monotonic()
                selector.unregister(key.fileobj)
    return closed


HALF = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-da"  # and nothing more


def test_connections_whose_headers_never_end_are_closed_at_the_deadline(server):
    """300 connections that send half their headers and stop (and one that does so after a first answer, kept alive)
    are all closed HEADER_SECONDS later, not held for ever; the server answers other requests meanwhile and after."""
    kept = connect(server)
    kept.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer(kept)[0] == 200  # the page, read to its end: the connection stays open for the next request
    opened = time.monotonic()
    socks = [connect(server) for _ in range(300)]
    try:
        for sock in [*socks, kept]:
            sock.sendall(HALF)
        assert post(server, pad_png())[0] == 200
        closed = closed_by([*socks, kept], opened + HEADER_SECONDS + 10)
        assert len(closed) == len(socks) + 1, f"{len(socks) + 1 - len(closed)} of {len(socks) + 1} still open"
        assert min(closed.values()) - opened > HEADER_SECONDS - 0.1  # not before the deadline
        assert post(server, pad_png())[0] == 200
    finally:
        for sock in [*socks, kept]:
            sock.close()
