"""Time per POST /predict of the demo server, one request at a time and 40 at once; its memory under large uploads
at once. Run by hand:

    python benchmarks/demo_load.py                          # the latest run's best.pt
    python benchmarks/demo_load.py --checkpoint runs/cnn/best.pt --rounds 5
    python benchmarks/demo_load.py --checkpoint runs/cnn/best.pt --memory          # 100 phone photos
    python benchmarks/demo_load.py --checkpoint runs/cnn/best.pt --memory png      # 4 of the largest PNGs

It starts `python demo.py` on a free port, as a user would, and posts what the page's pad sends:
a 280x280 PNG of dark strokes on a transparent canvas. It prints the median time per request
alone, and with 40 requests sent at once: the median a request waits for its answer and the wall
time of the 40 divided by 40. Each figure is a median over rounds. On a shared machine wall times
follow the other load (the scheduler shares the CPU per thread, so 40 busy threads get more of it
than one), so it also prints the CPU time of demo.classify, the work behind one request, in-process.

With --memory it sends 100 phone photos of about 9 MB at once instead (a 12-megapixel JPEG of a digit, with
sensor noise so that it stays large) and prints the server's peak resident memory (VmHWM, from /proc) before
and after them, and how the 100 were answered. With --memory png it sends the worst case for memory: 4 PNGs
at once of 8000x8000 RGBA pixels (64 megapixels, the most digits.MAX_PIXELS lets in) that compress to about
265 kB, so that 4 fit in what the server holds at once; a PNG has no draft mode, so each decodes in full.
"""

import argparse
import collections
import io
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np
from PIL import Image, ImageDraw

from config import Config
from demo import classify
from drawn_digits import serve
from model import load_checkpoint
from rundir import latest_checkpoint

CONCURRENT = 40
UPLOADS = 100  # phone photos sent at once by --memory
LARGEST = 4  # 64-megapixel PNGs sent at once by --memory png


def pad_png() -> bytes:
    """A '4' as the page's pad sends it: round dark strokes a twelfth of the pad wide, on transparency."""
    image = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in ([(170, 40), (60, 180), (220, 180)], [(180, 110), (180, 250)]):
        draw.line(stroke, fill=(29, 27, 46, 255), width=23, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name}, {info.count('processor')} cores{', AVX-512' if 'avx512f' in flags else ''}"


def timed_post(http: httpx.Client, data: bytes) -> float:
    start = time.perf_counter()
    response = http.post("/predict", files={"image": ("pad.png", data, "image/png")})
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text}")
    return seconds


def phone_photo(megabytes: float = 9) -> bytes:
    """A 4000x3000 JPEG of a dark 7 on grey paper with colour noise, at the highest quality that stays under
    `megabytes`: the size of a phone photo, decodable, and a digit to find."""
    rng = np.random.default_rng(0)
    paper = Image.new("L", (4000, 3000), 200)
    ImageDraw.Draw(paper).line([(1500, 800), (2500, 800), (1800, 2300)], fill=40, width=180)
    pixels = np.asarray(paper, dtype=np.float32)[..., None] + rng.normal(0, 20, (3000, 4000, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    for quality in range(97, 50, -1):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if buffer.tell() <= megabytes * 2**20:
            return buffer.getvalue()
    raise AssertionError("no quality gives a small enough photo")


def largest_png() -> bytes:
    """An 8000x8000 RGBA PNG of a dark 7 on white: 64 megapixels (digits.MAX_PIXELS), 256 MB decoded, 293 kB."""
    image = Image.new("RGBA", (8000, 8000), "white")
    ImageDraw.Draw(image).line([(2000, 1500), (6000, 1500), (3500, 6500)], fill=(30, 30, 30, 255), width=600)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def server_pid() -> int:
    """The PID of the one child process this script runs: the demo server that serve() started."""
    pids = [int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]
    if len(pids) != 1:
        raise RuntimeError(f"expected one child process (the server), found {pids}")
    return pids[0]


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def memory(checkpoint: Path, kind: str) -> None:
    """Peak RSS of the real server before and after the uploads sent at once (UPLOADS phone photos, or LARGEST of
    the largest PNGs), and the statuses."""
    if kind == "png":
        data, count, name, what = largest_png(), LARGEST, "large.png", "8000x8000 RGBA PNG"
    else:
        data, count, name, what = phone_photo(), UPLOADS, "photo.jpg", "4000x3000 JPEG"
    with (
        serve(checkpoint, timeout=300) as url,  # a start on a busy machine may take minutes
        httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=count)) as http,
        ThreadPoolExecutor(count) as pool,
    ):
        timed_post(http, pad_png())  # warm-up: lazy imports, the model's first forward pass
        pid = server_pid()
        idle = peak_rss_mb(pid)
        barrier = threading.Barrier(count)

        def one(_):
            barrier.wait()
            return http.post("/predict", files={"image": (name, data)}).status_code

        start = time.perf_counter()
        statuses = collections.Counter(pool.map(one, range(count)))
        seconds = time.perf_counter() - start
        loaded = peak_rss_mb(pid)
    print(f"CPU: {cpu_name()}")
    size = f"{len(data) / 2**20:.1f} MB" if len(data) > 2**20 else f"{len(data) / 1000:.0f} kB"
    print(
        f"{count} uploads of a {size} {what} at once: answered "
        f"{', '.join(f'{n} x {status}' for status, n in sorted(statuses.items()))} in {seconds:.0f} s"
    )
    print(f"server's peak RSS: {idle:.0f} MB after one small request, {loaded:.0f} MB after the uploads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a best.pt (default: the latest run's best.pt)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 20 single and 40 concurrent requests")
    parser.add_argument(
        "--memory",
        nargs="?",
        const="photos",
        choices=["photos", "png"],
        help=f"the peak RSS under {UPLOADS} 9 MB photos (or {LARGEST} 64-megapixel PNGs: png) sent at once instead",
    )
    args = parser.parse_args()
    data = pad_png()
    checkpoint = args.checkpoint or latest_checkpoint(Config().out_dir)
    if args.memory:
        return memory(checkpoint, args.memory)
    import torch

    torch.set_num_threads(1)  # as demo.py serves
    model = load_checkpoint(checkpoint)[0]
    classify(model, data)
    cpu = []
    for _ in range(args.rounds * 20):
        start = time.process_time()
        classify(model, data)
        cpu.append(time.process_time() - start)
    alone, waits, walls = [], [], []
    with (
        serve(checkpoint) as url,
        httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENT)) as http,
        ThreadPoolExecutor(CONCURRENT) as pool,
    ):
        timed_post(http, data)  # warm-up: the first request pays for lazy imports
        for _ in range(args.rounds):
            alone.append(statistics.median(timed_post(http, data) for _ in range(20)))
            barrier = threading.Barrier(CONCURRENT)

            def together(_, barrier=barrier):
                barrier.wait()
                return timed_post(http, data)

            start = time.perf_counter()
            times = list(pool.map(together, range(CONCURRENT)))
            walls.append((time.perf_counter() - start) / CONCURRENT)
            waits.append(statistics.median(times))

    def ms(values):
        return f"{statistics.median(values) * 1000:.0f} ms"

    print(f"CPU: {cpu_name()}")
    print(f"CPU time of demo.classify:   {ms(cpu)} per request (prepare_digit + model.predict, one thread)")
    print(f"one request at a time:       {ms(alone)} per request (median of {args.rounds} rounds of 20)")
    print(
        f"{CONCURRENT} requests at once: all 200; each waits {ms(waits)} (median), "
        f"the server answers one every {ms(walls)} (wall time / {CONCURRENT})"
    )


if __name__ == "__main__":
    main()
