"""Does the default recipe survive the settings users change? Whole `python train.py` runs on real MNIST. By hand:

    python benchmarks/recipe_sweep.py --data-dir ../shared/data --out-dir /tmp/recipe-sweep
    python benchmarks/recipe_sweep.py --data-dir ../shared/data --out-dir /tmp/old --flags --clip-grad-norm 0

Each row changes one setting from config.py's defaults, not the full grid: the number of epochs, then,
from a short base of 2 epochs (short runs are where a recipe near its edge dies), the batch size, the
threads, torchrun's 2 processes, the validation split and the augmentation, over seeds 0-3. Whether a
run near the edge dies depends on float summation order, so the thread count is a setting too.
--flags are added to every run: the second line above sweeps the recipe without gradient clipping.

Each finished run appends one JSON line to OUT_DIR/results.jsonl at once, so a stopped sweep keeps what
it measured and a second call runs only what is missing; the short rows go first, seed by seed. Two cores are kept busy: a run with one thread
shares the machine with another such run, a run with two threads (or torchrun's two processes) runs alone.
At the end it prints the table of docs/results.md: per row, the runs, the share that collapsed (test
accuracy below 50%, or stopped by train.py as dead), the worst and the median test accuracy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Config

SEEDS = (0, 1, 2, 3)
SHORT = ["--epochs", "2"]  # the base of every row but the first: 2 epochs of the default
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
COLLAPSED = 0.5  # a test accuracy below this is a dead run: chance is 10%, a live one is above 97%

# Rows: (name, flags, threads, launcher). threads is OMP_NUM_THREADS of each process; torchrun sets it to 1 itself.
ROWS = [
    *[(f"epochs {n}", ["--epochs", str(n)], 2, "python") for n in (1, 2, 4, 8)],
    *[(f"2 epochs, batch {n}", [*SHORT, "--batch-size", str(n)], 2, "python") for n in (64, 256, 512)],
    ("1 epoch, 1 thread", ["--epochs", "1"], 1, "python"),
    ("2 epochs, 1 thread", SHORT, 1, "python"),
    ("2 epochs, torchrun 2 processes x 1 thread", SHORT, 1, "torchrun"),
    ("2 epochs, --val-size 30000, 1 thread", [*SHORT, "--val-size", "30000"], 1, "python"),
    ("2 epochs, --val-size 30000", [*SHORT, "--val-size", "30000"], 2, "python"),
    ("2 epochs, --no-augment", [*SHORT, "--no-augment"], 2, "python"),
    # The margin: the most fragile row above at twice the peak learning rate.
    ("1 epoch, 1 thread, --lr 0.3 (twice the default)", ["--epochs", "1", "--lr", "0.3"], 1, "python"),
]


def epochs(flags: list[str]) -> int:
    return int(flags[flags.index("--epochs") + 1])


def cores(row) -> int:
    """The cores a run of `row` keeps busy: its threads, or torchrun's 2 processes."""
    return 2 if row[3] == "torchrun" else row[2]


def folder(row, seed: int) -> str:
    """A new run folder's name for each start: a stopped sweep's runs keep theirs, and nothing is deleted."""
    return f"{ROWS.index(row):02d}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def key(row: str, seed: int) -> str:
    return f"{row} | seed {seed}"


def command(row, seed: int, args) -> tuple[list[str], dict]:
    """The command line and environment of one run of `row`, into its own folder."""
    _, flags, threads, launcher = row
    argv = [
        str(ROOT / "train.py"),
        *["--data-dir", args.data_dir, "--no-download", "--no-tensorboard", "--seed", str(seed)],
        *["--out-dir", str(args.out_dir / "runs"), "--run-name", folder(row, seed)],
        *flags,
        *args.flags,
    ]
    launch = TORCHRUN if launcher == "torchrun" else [sys.executable]
    return [*launch, *argv], {**os.environ, "OMP_NUM_THREADS": str(threads)}


def outcome(row, seed: int, result: subprocess.CompletedProcess, seconds: float, args) -> dict:
    """One JSON line: the run's test accuracy, or None when train.py stopped it (dead: exit 1 and its error line)."""
    test = [line for line in result.stdout.splitlines() if line.startswith("test: ")]
    acc = float(test[-1].split("accuracy ")[1].split("%")[0]) / 100 if test and result.returncode == 0 else None
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return {
        "key": key(row[0], seed),
        "row": row[0],
        "seed": seed,
        "flags": row[1] + args.flags,
        "threads": row[2],
        "launcher": row[3],
        "exit": result.returncode,
        "test_acc": acc,
        "error": errors[-1] if errors else None,
        "seconds": round(seconds, 1),
    }


def sweep(args) -> None:
    """Run every (row, seed) that results.jsonl does not hold yet, keeping two cores busy."""
    results = args.out_dir / "results.jsonl"
    done = {json.loads(line)["key"] for line in results.read_text().splitlines()} if results.is_file() else set()
    todo = [(row, seed) for row in ROWS if row[0] in args.rows for seed in args.seeds if key(row[0], seed) not in done]
    # Seed by seed, the long rows (4 and 8 epochs) last: a sweep stopped early holds every short row alike.
    todo.sort(key=lambda job: (epochs(job[0][1]) >= 4, job[1], cores(job[0]), epochs(job[0][1])))

    def start(job) -> subprocess.Popen:
        cmd, env = command(*job, args)
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished(job, proc, out, err, seconds) -> None:
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        line = outcome(*job, result, seconds, args)
        with results.open("a") as f:
            f.write(json.dumps(line) + "\n")
        acc = "dead" if line["test_acc"] is None else f"{line['test_acc']:.2%}"
        print(f"{line['key']}: {acc} in {line['seconds']:.0f} s", file=sys.stderr, flush=True)

    run_on_two_cores(todo, lambda job: cores(job[0]), start, finished)


def run_on_two_cores(todo: list, cores, start, finished) -> None:
    """Run the jobs of `todo` in order, as many at once as two cores hold (cores(job) each, 1 or 2).

    start(job) starts a job's process; finished(job, process, stdout, stderr, seconds) takes each that ended by
    itself. One killed by a signal, as when the sweep is stopped, is left out, for the next call to run again."""
    running = []  # (job, process, start)
    while todo or running:
        if todo and sum(cores(job) for job, *_ in running) + cores(todo[0]) <= 2:
            job = todo.pop(0)
            running.append((job, start(job), time.perf_counter()))
            continue
        ended = next((entry for entry in running if entry[1].poll() is not None), None)
        if ended is None:
            time.sleep(0.5)
            continue
        running.remove(ended)
        job, proc, began = ended
        out, err = proc.communicate()
        if proc.returncode >= 0:
            finished(job, proc, out, err, time.perf_counter() - began)


def table(results: Path) -> str:
    """The markdown table of every row that results.jsonl holds, in ROWS order."""
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    out = [
        "| setting (changed from the default) | runs | collapsed | worst | median | s/run (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, *_ in ROWS:
        runs = [line for line in lines if line["row"] == name]
        if not runs:
            continue
        accs = [line["test_acc"] if line["test_acc"] is not None else 0.0 for line in runs]  # dead counts as 0
        dead = sum(acc < COLLAPSED for acc in accs)
        out.append(
            f"| {name} | {len(runs)} | {dead} ({dead / len(runs):.0%}) | {min(accs):.2%} | "
            f"{statistics.median(accs):.2%} | {statistics.median(line['seconds'] for line in runs):.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", Config().data_dir))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/recipe-sweep"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--rows", nargs="+", default=[name for name, *_ in ROWS], help="run only these rows, by name")
    parser.add_argument("--table", action="store_true", help="only print the table of what results.jsonl holds")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="train.py flags added to every run")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.table:
        sweep(args)
    print(table(args.out_dir / "results.jsonl"))


if __name__ == "__main__":
    main()
