"""Classify your own digit photos and scans with a trained checkpoint.

    python predict.py photo.jpg scan.png                    # the latest run's best.pt
    python predict.py digits/*.jpg --checkpoint exp1 --json     # run exp1's best.pt (or a run folder, or a .pt file)

Each image goes through digits.prepare_digit, MNIST's own preprocessing: ink found on either
polarity, background and noise removed, fitted into 20x20 and centred by centre of mass in 28x28.
A file that cannot be classified gets one line on stderr and the others are still classified;
the exit code is 0 when every file was classified and 1 when any failed.
"""

import json
import sys
import warnings
from pathlib import Path

from config import Config, Parser, UserError, exit_script
from digits import prepare_digit
from model import load_checkpoint, predict
from rundir import describe_checkpoint, find_checkpoint

CLOSE = 0.25  # a runner-up at least this probable is named beside the answer


def describe(path: str, probs: list[float]) -> str:
    """One line: the path, the digit and its probability, and the runner-up when it is close."""
    ranked = sorted(range(10), key=lambda d: -probs[d])
    first, second = ranked[0], ranked[1]
    line = f"{path}: {first} ({probs[first]:.1%})"
    if probs[second] >= CLOSE:
        line += f", or {second} ({probs[second]:.1%})"
    return line


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("images", nargs="+", help="image files: PNG, JPEG, WebP, GIF, BMP or TIFF, any size")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a best.pt or last.pt, a run folder, or a run name in runs/ (default: the latest run's best.pt)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON list of {path, digit, confidence, probabilities} instead of lines",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        checkpoint = find_checkpoint(args.checkpoint, Config().out_dir)
        model, ckpt = load_checkpoint(checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_checkpoint(checkpoint, ckpt), file=sys.stderr, flush=True)  # stderr: --json keeps stdout JSON
    # Pillow warns about what it skips in a damaged file (a tag, a short read): the file's one line says enough
    warnings.filterwarnings("ignore", module="PIL")
    results, failed = [], 0
    for path in args.images:
        try:
            digit = prepare_digit(path)
        except ValueError as e:  # not an image, missing, no ink: say so and go on with the others
            print(f"error: {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        probs = predict(model, digit, prepare=False)[1][0].tolist()
        results.append(
            {
                "path": path,
                "digit": max(range(10), key=probs.__getitem__),
                "confidence": max(probs),
                "probabilities": probs,
            }
        )
        if not args.json:
            print(describe(path, probs), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    exit_script(main())
