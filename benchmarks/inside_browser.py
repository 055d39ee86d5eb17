"""The views of the network's inside, on a stand-in for a phone: both pages in headless Chromium at 390 px wide with
the CPU slowed 4x (CDP Emulation.setCPUThrottlingRate), the views open:

    python benchmarks/inside_browser.py --checkpoint runs/cnn/best.pt --repeats 20
    python benchmarks/inside_browser.py --checkpoint runs/cnn/best.pt --screenshots docs   # demo.png and web.png too

For the served page (`python demo.py`) and the static page (export.py --format web, exported to a temporary folder
and served by `python -m http.server`), both on 127.0.0.1, it draws the same 5 --repeats times, each time after
Clear, with the views open (--folded: as a phone first shows them), and prints:
  - the time per update: #prediction's data-ms after the last update of each drawing, from the pad's pixels to
    every view drawn (the answer, the bars, 42 maps, the logits), as demo.js measures it; median and largest;
  - the main thread's long tasks (over 50 ms, by PerformanceObserver) while drawing, which is where a page
    stutters: how many, and the longest; and of them, demo.js's show(): the answer with every view drawn;
  - the bytes of one answer: the served page's JSON with ?inside=1 against without; the static page's files.
With --screenshots it saves each page at 1000 x 1480, not throttled, with a drawn 5 and its views open.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from web_browser import http_server

import export
from drawn_digits import ARGS, CHROMIUM, WAIT_MS, answer, draw, serve, strokes_on_pad

# The main thread's long tasks, and the time demo.js's show() takes to draw an answer with all its views
LONG_TASKS = """() => {
    window.longTasks = [];
    new PerformanceObserver((list) => window.longTasks.push(...list.getEntries().map((e) => e.duration)))
        .observe({ type: "longtask" });
    window.showTimes = [];
    const shown = window.show;
    window.show = (answer) => {
        const start = performance.now();
        shown(answer);
        window.showTimes.push(performance.now() - start);
    };
}"""


def draw_five(page) -> str:
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    draw(page, strokes_on_pad(5, np.random.default_rng(3), box["width"], height=0.7, slant=0.12), box)
    return answer(page)


def open_views(page) -> None:
    if not page.evaluate("document.getElementById('inside').open"):
        page.click("#inside summary")


def measure(browser, url: str, repeats: int, rate: float, folded: bool) -> dict:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True)
    page.set_default_timeout(WAIT_MS)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": rate})
    page.goto(url)
    if not folded:
        open_views(page)
    draw_five(page)  # the first answer waits for the model to load: not an update like the others
    page.evaluate(LONG_TASKS)
    times = []
    for _ in range(repeats):
        assert draw_five(page) == page.get_attribute("#prediction", "data-digit") != ""
        times.append(float(page.get_attribute("#prediction", "data-ms")))
    tasks, shows = page.evaluate("window.longTasks"), page.evaluate("window.showTimes")
    page.close()
    return {"times": times, "tasks": tasks, "shows": shows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rate", type=float, default=4, help="CPU slowdown (default 4)")
    parser.add_argument("--folded", action="store_true", help="leave the views folded, as a phone first shows them")
    parser.add_argument("--screenshots", type=Path, help="a folder for demo.png and web.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        site = Path(tmp) / "web"
        assert export.main([str(args.checkpoint), "--format", "web", "--out", str(site)]) == 0
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        with serve(args.checkpoint) as served, http_server(site) as static:
            pad = (ROOT / "docs" / "demo.png").read_bytes()  # any picture of a digit for the size of an answer
            with httpx.Client(base_url=served, timeout=60) as client:
                sizes = [
                    len(client.post(f"/predict{q}", files={"image": ("d.png", pad)}).content) for q in ("", "?inside=1")
                ]
            print(f"served answer: {sizes[0]:,} bytes, with ?inside=1 {sizes[1]:,} bytes")
            files = {p.name: p.stat().st_size for p in site.iterdir()}
            print(
                f"static site: {sum(files.values()) / 1e6:.1f} MB in {len(files)} files; inside.json {files['inside.json']:,} bytes, model.onnx {files['model.onnx']:,}"
            )
            for name, url in (("served", served), ("static", static)):
                result = measure(browser, url, args.repeats, args.rate, args.folded)
                times, tasks, shows = result["times"], result["tasks"], result["shows"]
                print(
                    f"{name:>6} page, 390 px, CPU /{args.rate:g}, views {'folded' if args.folded else 'open'}: time per update median {statistics.median(times):.0f} ms, "
                    f"largest {max(times):.0f} ms ({len(times)} drawings); long tasks while drawing: {len(tasks)}, "
                    f"longest {max(tasks, default=0):.0f} ms; show() with every view median {statistics.median(shows):.1f} ms, "
                    f"largest {max(shows):.1f} ms ({len(shows)} answers)"
                )
            if args.screenshots:
                for name, url in (("demo", served), ("web", static)):
                    page = browser.new_page(viewport={"width": 1000, "height": 1480})
                    page.set_default_timeout(WAIT_MS)
                    page.goto(url)
                    open_views(page)
                    draw_five(page)
                    page.wait_for_timeout(400)  # the bars' 0.2 s transition
                    page.screenshot(path=args.screenshots / f"{name}.png")
                    page.close()
        browser.close()


if __name__ == "__main__":
    main()
