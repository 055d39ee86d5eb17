"""Time per POST /predict of the demo server, one request at a time and 40 at once. Run by hand:

    python benchmarks/demo_load.py                          # the latest run's best.pt
    python benchmarks/demo_load.py --checkpoint runs/cnn/best.pt --rounds 5

It starts `python demo.py` on a free port, as a user would, and posts what the page's pad sends:
a 280x280 PNG of dark strokes on a transparent canvas. It prints the median time per request
alone, and with 40 requests sent at once: the median a request waits for its answer and the wall
time of the 40 divided by 40. Each figure is a median over rounds. On a shared machine wall times
follow the other load (the scheduler shares the CPU per thread, so 40 busy threads get more of it
than one), so it also prints the CPU time of demo.classify, the work behind one request, in-process.
"""

import argparse
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx
from demo_browser import serve
from PIL import Image, ImageDraw

from config import Config
from demo import classify
from model import load_checkpoint
from rundir import latest_checkpoint

CONCURRENT = 40


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a best.pt (default: the latest run's best.pt)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 20 single and 40 concurrent requests")
    args = parser.parse_args()
    data = pad_png()
    checkpoint = args.checkpoint or latest_checkpoint(Config().out_dir)
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
