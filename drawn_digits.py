"""Digits drawn with the mouse on the demo's page, in a real headless Chromium, for the browser tests and benchmarks.

serve() runs `python demo.py` as a user would; strokes_on_pad() writes a digit's pen strokes (no MNIST images),
with a random size, place and slant; draw() moves the mouse along them with the button down, and answer()
reads #prediction[data-digit] once the page is idle. Needs Chromium (`apt-get install -y chromium`) and
playwright (requirements-dev.txt): only the tests and benchmarks/ import this module.
"""

import contextlib
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000  # for any one answer from the page


@contextlib.contextmanager
def serve(checkpoint, timeout: float = 60, cwd=ROOT):
    """Run `python demo.py --port 0` in `cwd` as a user would (without --checkpoint when it is None) and yield
    its address; then stop it with Ctrl-C (SIGINT) and raise unless it exits with 0 and no traceback."""
    flags = ["--port", "0"] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    # stderr goes to a file, not a pipe: a pipe nobody reads while the server runs blocks it once it holds 64 KiB
    with tempfile.TemporaryFile("w+") as stderr:

        def tail(lines: int | None = 20) -> str:
            stderr.seek(0)
            return "".join(stderr.readlines()[-lines if lines else 0 :])

        proc = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "demo.py"), *flags],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            with selectors.DefaultSelector() as selector:  # wait for the address line, for at most `timeout`
                selector.register(proc.stdout, selectors.EVENT_READ)
                if not selector.select(timeout):
                    raise TimeoutError(f"demo.py printed no address in {timeout} s; its stderr ends:\n{tail()}")
            line = proc.stdout.readline()
            if not line.startswith("serving the demo on http://127.0.0.1:"):
                if not line:  # it closed its stdout: it has ended, and its stderr says why
                    proc.wait(timeout=20)
                raise RuntimeError(f"demo.py did not start: {line}{tail()}")
            yield line.split()[4]
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=20)
            err = tail(lines=None)
            if proc.returncode != 0 or "Traceback" in err:
                raise RuntimeError(f"demo.py did not stop cleanly on Ctrl-C (exit {proc.returncode}): {err}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# --- digits as pen strokes -------------------------------------------------------------------
# Each digit is one or more strokes, each a list of (x, y) points in a unit box (y down), written the
# way people write them. Some digits have two common forms (a 1 with a flag, an open 4, a 7 with a bar).


def arc(cx, cy, rx, ry, start, end, n=16):
    """Points along an ellipse from angle `start` to `end`, in degrees (0 is right, 90 is down)."""
    return [
        (cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a))) for a in np.linspace(start, end, n)
    ]


DIGITS = {
    0: [[[*arc(0.5, 0.5, 0.34, 0.46, -90, -450, 24)]]],
    1: [[[(0.52, 0.03), (0.5, 0.97)]], [[(0.3, 0.22), (0.55, 0.03), (0.52, 0.97)]]],
    2: [[[*arc(0.5, 0.3, 0.32, 0.26, 200, 385), (0.15, 0.96), (0.88, 0.96)]]],
    3: [[[*arc(0.47, 0.27, 0.3, 0.23, 210, 450), *arc(0.47, 0.73, 0.34, 0.24, 270, 510)]]],
    4: [
        [[(0.62, 0.03), (0.1, 0.66), (0.9, 0.66)], [(0.66, 0.3), (0.66, 0.97)]],
        [[(0.2, 0.03), (0.15, 0.58), (0.88, 0.58)], [(0.7, 0.03), (0.7, 0.97)]],
    ],
    5: [[[(0.82, 0.04), (0.3, 0.04), (0.25, 0.46), *arc(0.5, 0.69, 0.33, 0.28, 235, 520)]]],
    6: [[[(0.72, 0.03), (0.42, 0.25), (0.22, 0.55), *arc(0.5, 0.73, 0.28, 0.24, 180, -180)]]],
    7: [
        [[(0.12, 0.05), (0.88, 0.05), (0.38, 0.97)]],
        [[(0.12, 0.05), (0.88, 0.05), (0.38, 0.97)], [(0.4, 0.52), (0.8, 0.52)]],
    ],
    8: [[[*arc(0.5, 0.26, 0.26, 0.23, 90, 450)], [*arc(0.5, 0.73, 0.31, 0.25, -90, 270)]]],
    9: [[[*arc(0.45, 0.3, 0.3, 0.26, 0, -360), (0.75, 0.3), (0.68, 0.97)]]],
}


def strokes_on_pad(digit: int, rng: np.random.Generator, pad: float, height=None, slant=None):
    """One drawing of `digit` as strokes of (x, y) in pad pixels: a random form, height (35-85% of the pad
    unless given), width, place, slant (x shifts by -0.3 to 0.3 of the height from bottom to top, unless
    given) and a slight tremor of the hand."""
    form = DIGITS[digit][rng.integers(len(DIGITS[digit]))]
    height = (height or rng.uniform(0.35, 0.85)) * pad
    width = height * rng.uniform(0.5, 0.8)
    slant = rng.uniform(-0.3, 0.3) if slant is None else slant
    margin = 0.06 * pad
    room_x = pad - 2 * margin - width - abs(slant) * height
    left = margin + max(slant, 0) * height + rng.uniform(0, max(room_x, 0))
    top = margin + rng.uniform(0, max(pad - 2 * margin - height, 0))
    jitter = 0.012 * height
    return [
        [
            (
                left + x * width + slant * (0.5 - y) * height + rng.normal(0, jitter),
                top + y * height + rng.normal(0, jitter),
            )
            for x, y in stroke
        ]
        for stroke in form
    ]


def draw(page, strokes, box, offset=(0.0, 0.0), step=12.0):
    """Move the mouse along each stroke with the button down, a point every `step` pixels, as a hand would."""
    mouse = page.mouse
    for stroke in strokes:
        x0, y0 = box["x"] + stroke[0][0] + offset[0], box["y"] + stroke[0][1] + offset[1]
        mouse.move(x0, y0)
        mouse.down()
        for x, y in stroke[1:]:
            x, y = box["x"] + x + offset[0], box["y"] + y + offset[1]
            mouse.move(x, y, steps=max(1, int(math.hypot(x - x0, y - y0) / step)))
            x0, y0 = x, y
        mouse.up()


def answer(page) -> str:
    """#prediction's data-digit once the page has no request in flight or waiting."""
    page.wait_for_selector('#prediction[aria-busy="false"]', timeout=WAIT_MS)
    return page.get_attribute("#prediction", "data-digit")


def draw_digit(page, digit, rng) -> str:
    """Draw one varied `digit` with a random stroke width (extra passes beside the first), return the answer."""
    box = page.locator("#pad").bounding_box()
    strokes = strokes_on_pad(digit, rng, box["width"])
    passes = rng.integers(1, 3)  # a second pass beside the first: strokes from the pen's width to about 1.5x it
    spread = rng.uniform(3, 8)
    for i in range(passes):
        angle = rng.uniform(0, 2 * math.pi)
        draw(page, strokes, box, offset=(0, 0) if i == 0 else (spread * math.cos(angle), spread * math.sin(angle)))
    return answer(page)
