"""The sweep behind config.py's augmentation recipe: whole `python train.py` runs, seeds 0-2. Run by hand:

    python benchmarks/augment_sweep.py --data-dir ../shared/data --out-dir /tmp/aug-sweep
    python benchmarks/augment_sweep.py --data-dir ../shared/data --out-dir /tmp/aug-sweep --only e8 old --seeds 0 1

Each recipe is a set of flags on top of the config's defaults, spelled out in full so the table stays
true when the defaults change. Runs go one after another. A run whose metrics.json already holds a test
accuracy is not run again, so the sweep can be stopped, resumed (train.py --resume in the run's folder)
and split over several shells with --only and --seeds; a last call with every recipe then only reads.
It prints one row per recipe: test accuracy per seed, median and worst. Accuracy, not time, is what
it measures: benchmarks/speed.py --baseline times the chosen recipe against the old one.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# fd3b740's optimisation settings, unclipped as this sweep ran (benchmarks/recipe_sweep.py chose clipping later)
OLD = ["--lr", "0.15", "--weight-decay", "1.5e-3", "--warmup", "0.2", "--clip-grad-norm", "0"]
AUG = ["--augment", "--aug-rotate", "10", "--aug-scale", "0.1", "--aug-shear", "0", "--aug-shift", "2"]  # the issue's
RECIPES = {  # name: flags; in the order they run, the most telling first
    "old": ["--no-augment", "--epochs", "4", *OLD],  # fd3b740's default recipe
    "e8": ["--epochs", "8", *OLD, *AUG],
    "e7": ["--epochs", "7", *OLD, *AUG],
    "e8-shear": ["--epochs", "8", *OLD, *AUG, "--aug-shear", "10"],
    "e8-wd5e-4": ["--epochs", "8", *OLD, "--weight-decay", "5e-4", *AUG],
    "e8-strong": [
        "--epochs",
        "8",
        *OLD,
        "--augment",
        "--aug-rotate",
        "15",
        "--aug-scale",
        "0.15",
        "--aug-shear",
        "10",
        "--aug-shift",
        "3",
    ],
    "e8-warmup0.1": ["--epochs", "8", *OLD, "--warmup", "0.1", *AUG],
    "e8-lr0.1": ["--epochs", "8", *OLD, "--lr", "0.1", *AUG],
}


def run(name: str, seed: int, data_dir: str, out_dir: Path) -> float:
    """Test accuracy of recipe `name` at `seed`, from its run's metrics.json (training it first if needed)."""
    run_dir = out_dir / f"{name}-s{seed}"
    metrics = run_dir / "metrics.json"
    if not (metrics.is_file() and "test_acc" in json.loads(metrics.read_text())):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "--data-dir",
                data_dir,
                "--no-download",
                "--out-dir",
                str(out_dir),
                "--run-name",
                run_dir.name,
                "--seed",
                str(seed),
                "--no-tensorboard",
                *RECIPES[name],
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return json.loads(metrics.read_text())["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/augment-sweep"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=RECIPES, help="run only these recipes")
    args = parser.parse_args()
    for name in args.only or RECIPES:
        accs = [run(name, seed, args.data_dir, args.out_dir) for seed in args.seeds]
        print(
            f"{name:<12} {' '.join(f'{a:.2%}' for a in accs)}  median {statistics.median(accs):.2%}  "
            f"worst {min(accs):.2%}  | {' '.join(RECIPES[name])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
