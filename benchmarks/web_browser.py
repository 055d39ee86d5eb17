"""The static site (`python export.py --format web`) in headless Chromium, against the served demo, in one session:

    python benchmarks/web_browser.py                                  # the latest run's best.pt
    python benchmarks/web_browser.py --checkpoint runs/cnn/best.pt --repeats 100 --screenshot docs/web.png

It exports the site to a temporary folder, serves it with `python -m http.server` and starts `python demo.py`,
both on 127.0.0.1, and prints:
  - the folder's size, file by file;
  - from navigation to the first answer to a digit drawn at once (a fresh browser context each time, so
    nothing is cached; median of --loads);
  - per classification of the same drawing, the page's own classifier.classify(pad) timed inside the page:
    in the browser (the pad's pixels to the worker, prepare.js, onnxruntime-web, the answer back) and through
    the server (the pad as PNG, POST /predict, prepare_digit and the model, the JSON back); medians of
    --repeats, and the worker's two parts;
  - drawing and reading 10 digits with the mouse on each page, as the tests do: seconds per digit (median).
With --screenshot it saves the static page with a drawn digit and its answer.
Needs Chromium (`apt-get install -y chromium`), `pip install playwright`, and `npm ci` for onnxruntime-web.
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export
from drawn_digits import ARGS, CHROMIUM, WAIT_MS, answer, draw, draw_digit, serve, strokes_on_pad


@contextlib.contextmanager
def http_server(folder: Path):
    """`python -m http.server -d FOLDER` on a free port of 127.0.0.1; yield its address, then stop it."""
    command = [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "-d", str(folder), "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        yield line.split("(")[1].split(")")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def draw_five(page):
    """The same drawn 5 on any page: the digit every timing classifies."""
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    draw(page, strokes_on_pad(5, np.random.default_rng(3), box["width"], height=0.7, slant=0.12), box)
    return answer(page)


TIME_CLASSIFY = """async (repeats) => {
    const pad = document.getElementById("pad");
    const times = [];
    for (let i = 0; i < repeats; i++) {
        const start = performance.now();
        await classifier.classify(pad, null);
        times.push(performance.now() - start);
    }
    return times;
}"""

TIME_PARTS = """async (repeats) => {
    const pad = document.getElementById("pad");
    const prepare = [], run = [];
    for (let i = 0; i < repeats; i++) {
        const { ms } = await classifier.classify(pad, null);  // the worker's own timings
        prepare.push(ms.prepare);
        run.push(ms.run);
    }
    return [prepare, run];
}"""


def first_answer(browser, url) -> float:
    """In a fresh context, nothing cached: ms from navigation to the answer to a digit drawn at once."""
    context = browser.new_context(viewport={"width": 1000, "height": 660})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    box = page.locator("#pad").bounding_box()
    draw(page, [[(100, 60), (90, 230)]], box)
    answer(page)
    done = page.evaluate("performance.now()")  # ms since the navigation began
    context.close()
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a best.pt (default: the latest run's best.pt)")
    parser.add_argument("--repeats", type=int, default=50, help="classifications timed on each page (default 50)")
    parser.add_argument("--loads", type=int, default=5, help="cold page loads timed (default 5)")
    parser.add_argument("--screenshot", type=Path, help="save the static page with a drawn 5 here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from config import Config
    from rundir import latest_checkpoint

    checkpoint = args.checkpoint or latest_checkpoint(Config().out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "web"
        if export.main([str(checkpoint), "--format", "web", "--out", str(site)]) != 0:
            sys.exit(2)
        sizes = {p.name: p.stat().st_size for p in sorted(site.iterdir())}
        print(f"\n{site.name}/: {sum(sizes.values()) / 1e6:.2f} MB in {len(sizes)} files")
        for name, size in sizes.items():
            print(f"  {name:<30} {size / 1e3:>9.1f} kB")
        with http_server(site) as static_url, serve(checkpoint) as served_url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            loads = [first_answer(browser, static_url) for _ in range(args.loads)]
            print(
                f"static page, cold loads: the first answer {statistics.median(loads):.0f} ms after navigation (median of {args.loads})"
            )
            times = {}
            for name, url in (("browser", static_url), ("server", served_url)):
                page = browser.new_page(viewport={"width": 1000, "height": 660})
                page.set_default_timeout(WAIT_MS)
                page.goto(url)
                rng = np.random.default_rng(0)
                drawings = []
                for i in range(10):
                    page.click("#clear")
                    start = time.perf_counter()
                    draw_digit(page, i, rng)
                    drawings.append(time.perf_counter() - start)
                digit = draw_five(page)
                page.evaluate(TIME_CLASSIFY, 5)  # warm up: the first calls compile and allocate
                times[name] = page.evaluate(TIME_CLASSIFY, args.repeats)
                print(
                    f"{name:<8} classifier.classify(pad): median {statistics.median(times[name]):.1f} ms "
                    f"(min {min(times[name]):.1f}) over {args.repeats}; the drawn 5 read as {digit}; "
                    f"{statistics.median(drawings):.1f} s to draw and read a digit with the mouse (median of 10)"
                )
                if name == "browser":
                    prepare, run = page.evaluate(TIME_PARTS, args.repeats)
                    print(
                        f"         of which prepare.js {statistics.median(prepare):.1f} ms, "
                        f"onnxruntime-web {statistics.median(run):.2f} ms (medians)"
                    )
                    if args.screenshot:
                        page.wait_for_timeout(400)  # the bars' 0.2 s transition
                        page.screenshot(path=args.screenshot)
                page.close()
            ratio = statistics.median(times["server"]) / statistics.median(times["browser"])
            print(f"the browser answers {ratio:.2f}x as fast as the server (medians, same session)")
            browser.close()


if __name__ == "__main__":
    main()
