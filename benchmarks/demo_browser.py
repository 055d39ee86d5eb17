"""How well the demo page reads digits drawn with the mouse, in a real headless Chromium. Run by hand:

    python benchmarks/demo_browser.py                                   # the latest run's best.pt, 100 drawings
    python benchmarks/demo_browser.py --checkpoint runs/cnn/best.pt --count 200 --screenshots docs

It starts `python demo.py` on a free port, draws each digit on #pad by moving the mouse along pen
strokes written here (no MNIST images), with a random size, place, slant, stroke width and a
slight tremor, and reads #prediction[data-digit]. It prints the share read right. With
--screenshots it saves demo.png (a drawn digit and its answer) and demo-phone.png (a phone screen).
The drawing helpers are in drawn_digits.py, which the browser tests use too.
Needs Chromium (`apt-get install -y chromium`) and `pip install playwright`.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drawn_digits import ARGS, CHROMIUM, WAIT_MS, answer, draw, draw_digit, serve, strokes_on_pad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a best.pt (default: the latest run's best.pt)")
    parser.add_argument("--count", type=int, default=100, help="drawings, cycling through 0-9 (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screenshots", type=Path, help="a folder for demo.png and demo-phone.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from config import Config
    from rundir import latest_checkpoint

    checkpoint = args.checkpoint or latest_checkpoint(Config().out_dir)
    rng = np.random.default_rng(args.seed)
    with serve(checkpoint) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 660})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        wrong = []
        for i in range(args.count):
            page.click("#clear")
            if (got := draw_digit(page, i % 10, rng)) != str(i % 10):
                wrong.append((i % 10, got))
        print(
            f"{checkpoint}: {args.count - len(wrong)} of {args.count} drawn digits read right "
            f"({1 - len(wrong) / args.count:.1%}); wrong (drawn, read): {wrong}"
        )
        if args.screenshots:
            page.click("#clear")
            box = page.locator("#pad").bounding_box()
            draw(page, strokes_on_pad(5, np.random.default_rng(3), box["width"], height=0.7, slant=0.12), box)
            answer(page)
            page.wait_for_timeout(400)  # the bars' 0.2 s transition
            page.screenshot(path=args.screenshots / "demo.png")
            phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True)
            phone.goto(url)
            box = phone.locator("#pad").bounding_box()
            draw(phone, strokes_on_pad(2, np.random.default_rng(1), box["width"], height=0.7, slant=0.1), box)
            answer(phone)
            phone.wait_for_timeout(400)
            phone.screenshot(path=args.screenshots / "demo-phone.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
