"""Speed and memory of the training pipeline on real MNIST. Not part of the tests; run it by hand:

    python benchmarks/speed.py --data-dir ../shared/data

It prints one table, quoted in the README. Every figure is a median of several runs, and the
two pipelines are compared within the same run, because this machine is shared and noisy:
  (a) training images/s: ours against the reference post's pipeline (PIL list + DataLoader), as a ratio,
      and ours as a fraction of the CPU's FP32 peak, from the FLOPs of the layer shapes;
  (b) time to 99.0% test accuracy, median over seeds;
  (c) wall time, test accuracy and peak memory (RSS) of the default `python train.py`;
  (d) evaluation images/s;
  (e) with --ddp, only: one process with 2 threads against torchrun's 2 processes with 1 thread each;
  (f) with --baseline REV, only: this version against REV, as ratios, interleaved seed by seed;
  (g) with --factors, only: the speed-up over the reference post split into its three factors, each
      measured on its own: tensor-resident data, channels-last tensors, and batch 128 instead of 64;
  (h) with --busy, only: training images/s with 1 thread and with torch's default threads, on an idle
      machine and beside one busy-looping process per CPU (a laptop busy with other work).
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import tblog
import train
from config import Config, parse_args
from data import MNIST_MEAN, MNIST_STD, epoch_order, load_splits
from model import CNN, MEMORY_FORMAT, build_model, load_checkpoint, model_logits


def conv_flops(c_in, c_out, k, h_out, w_out) -> int:
    return 2 * c_in * k * k * c_out * h_out * w_out


def cnn_train_flops() -> int:
    """FLOPs of one training step per image, from the layer shapes (multiply-add = 2 FLOPs).

    Backward costs two forwards (input and weight gradients) for each layer but conv1, whose
    input needs no gradient. Pooling and ReLU are left out: they are memory-bound and tiny.
    """
    conv1, conv2, fc = conv_flops(1, 10, 5, 24, 24), conv_flops(10, 20, 5, 8, 8), 2 * 320 * 10
    return (conv1 + conv2 + fc) + (conv1 + 2 * conv2 + 2 * fc)


def peak_flops() -> tuple[float, str]:
    """FP32 peak of this machine: cores x clock x FLOPs per cycle (two FMA units of the widest vectors)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(line.split(":")[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    per_cycle = 2 * 2 * lanes  # 2 FMA units x 2 FLOPs x fp32 lanes
    cores = torch.get_num_threads()
    ghz = (statistics.median(mhz) if mhz else 2000) / 1000
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle"


# --- (a) training throughput -------------------------------------------------------------


class ReferenceMNIST(Dataset):
    """The reference post's `mnistData`: Python lists of PIL images and labels, one transform per item."""

    def __init__(self, images, labels, transform):
        from PIL import Image

        self.images = [Image.fromarray(image.numpy(), mode="L") for image in images]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def images_per_second(batches, model, optimizer, n_images: int) -> float:
    """Train on `batches` until n_images are seen; return images/s (batch preparation included)."""
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
        if seen >= n_images:
            break
    return seen / (time.perf_counter() - start)


def ours(train_split, cfg: Config, n_images: int, memory_format=MEMORY_FORMAT) -> float:
    model = build_model("cnn").to(memory_format=memory_format)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )

    def batches(epoch):
        order = epoch_order(len(train_split), 0, epoch, "cpu")
        return ((x.contiguous(memory_format=memory_format), y) for x, y in train_split.batches(cfg.batch_size, order))

    images_per_second(batches(0), model, optimizer, cfg.batch_size * 3)  # warm-up: oneDNN picks its kernels
    return images_per_second(batches(1), model, optimizer, n_images)


def reference(reference_data, n_images: int) -> float:
    model = CNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(reference_data, batch_size=64, shuffle=True)
    images_per_second(iter(loader), model, optimizer, 64 * 3)
    return images_per_second(iter(loader), model, optimizer, n_images)


# --- (b) time to accuracy ----------------------------------------------------------------


def time_to_accuracy(splits, cfg: Config, target: float) -> tuple[float | None, int, float]:
    """Train with cfg, testing after every epoch; return (training seconds to reach target or None, epochs, accuracy)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    optimizer, scheduler = train.make_optimizer(model, cfg, math.ceil(len(splits["train"]) / cfg.batch_size))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = train.State(
        cfg,
        Path(),
        torch.device("cpu"),
        splits,
        model,
        model,
        optimizer,
        scheduler,
        scaler,
        tblog.NoLog(),
        {"epoch_progress": train.new_progress()},
    )
    elapsed, accuracy = 0.0, 0.0
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        train.train_epoch(state, epoch, lambda: False)
        elapsed += time.perf_counter() - start  # the test evaluation is not training time
        _, accuracy = train.validate(model, splits["test"], cfg.eval_batch_size)
        if accuracy >= target:
            return elapsed, epoch + 1, accuracy
    return None, cfg.epochs, accuracy


# --- (c) the whole default run -------------------------------------------------------------

# Runs a script as __main__ and reports the process's own peak RSS (KiB on Linux) as it exits. The parent's
# RUSAGE_CHILDREN would not do: it can count this large benchmark process's pages in the child before exec.
REPORT_PEAK_RSS = (
    "import atexit, resource, runpy, sys; atexit.register(lambda: print('peak-rss-kib', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def whole_run(data_dir: str, out_dir: Path, seed: int, *flags: str, root: Path = ROOT) -> dict:
    """`python train.py` of the project at `root` with the defaults but the seed and `flags`, timed as a whole:
    wall seconds, test accuracy, peak RSS (MiB), and the fixed cost (wall minus the epochs' own seconds)."""
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            REPORT_PEAK_RSS,
            str(root / "train.py"),
            "--data-dir",
            data_dir,
            "--out-dir",
            str(out_dir),
            "--seed",
            str(seed),
            *flags,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
    )
    wall = time.perf_counter() - start
    peak_kib = int(result.stderr.split("peak-rss-kib")[-1].split()[0])
    [best] = out_dir.glob("**/best.pt")  # the run's own folder, or out_dir itself for versions without run folders
    ckpt = load_checkpoint(best)[1]
    return {
        "wall": wall,
        "acc": ckpt["test_acc"],
        "rss": peak_kib / 1024,
        "fixed": wall - sum(row["seconds"] for row in ckpt["history"]),
    }


# --- (f) against an earlier version, interleaved in one run -------------------------------------


def baseline_rows(rev: str, data_dir: str, out_dir: Path, seeds: int) -> list[tuple[str, str]]:
    """This version against REV, as ratios ours / baseline: REV is checked out into a temporary git worktree, and the two
    versions' runs alternate, seed by seed, so that the machine's load falls on both alike."""
    worktree = Path(tempfile.mkdtemp(prefix="baseline-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), rev], check=True, capture_output=True
    )
    try:
        base, ours, fast = [], [], []
        for seed in range(seeds):
            base.append(whole_run(data_dir, out_dir / f"base-{seed}", seed, root=worktree))
            ours.append(whole_run(data_dir, out_dir / f"ours-{seed}", seed))
            # fd3b740's recipe (4 epochs, unwarped images, unclipped): it should reproduce that version's accuracy
            fast.append(
                whole_run(
                    data_dir, out_dir / f"plain-{seed}", seed, "--no-augment", "--epochs", "4", "--clip-grad-norm", "0"
                )
            )
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)

    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    def accs(runs):
        return f"{median(runs, 'acc'):.2%} median ({', '.join(format(run['acc'], '.2%') for run in runs)})"

    def peak(runs):
        return max(run["rss"] for run in runs)

    return [
        (f"baseline {rev}, default: test accuracy", accs(base)),
        (
            f"baseline {rev}, default: wall time, fixed cost, peak RSS",
            f"{median(base, 'wall'):.1f} s, {median(base, 'fixed'):.1f} s, {peak(base):,.0f} MiB",
        ),
        ("ours, default: test accuracy", accs(ours)),
        (
            "ours, default: wall time / baseline default's",
            f"{median(ours, 'wall') / median(base, 'wall'):.2f} ({median(ours, 'wall'):.1f} s)",
        ),
        ("ours, fd3b740 recipe (--no-augment --epochs 4 --clip-grad-norm 0): test accuracy", accs(fast)),
        (
            "ours, fd3b740 recipe (--no-augment --epochs 4 --clip-grad-norm 0): wall time / baseline default's",
            f"{median(fast, 'wall') / median(base, 'wall'):.2f} ({median(fast, 'wall'):.1f} s)",
        ),
        (
            "ours, default: fixed cost / baseline's",
            f"{median(ours, 'fixed') / median(base, 'fixed'):.2f} ({median(ours, 'fixed'):.1f} s)",
        ),
        ("ours, default: peak RSS / baseline's", f"{peak(ours) / peak(base):.2f} ({peak(ours):,.0f} MiB)"),
    ]


# --- (e) one process against two under torchrun ------------------------------------------------


def epoch_rate(launcher: list[str], data_dir: str, out_dir: Path, batch_size: int) -> tuple[float, float]:
    """Train 2 epochs with `launcher train.py`; return the median (seconds per epoch, images/s) of the printed rows."""
    result = subprocess.run(
        [
            *launcher,
            str(ROOT / "train.py"),
            "--data-dir",
            data_dir,
            "--out-dir",
            str(out_dir),
            "--epochs",
            "2",
            "--batch-size",
            str(batch_size),
            "--no-tensorboard",
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = statistics.median(
        float(line.split()[6]) for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()
    )
    train_images = 60_000 - Config().val_size
    return seconds, train_images / seconds


def ddp_rows(data_dir: str, out_dir: Path, repeats: int) -> list[tuple[str, str]]:
    """1 process x 2 threads against torchrun's 2 processes x 1 thread, interleaved, at two global batch sizes."""
    single = [sys.executable]
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    rows = []
    for batch_size in (Config().batch_size, 512):
        runs = [
            (epoch_rate(single, data_dir, out_dir, batch_size), epoch_rate(double, data_dir, out_dir, batch_size))
            for _ in range(repeats)
        ]
        (s1, r1), (s2, r2) = (
            (statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs)) for i in (0, 1)
        )
        ratio = statistics.median(r[1][1] / r[0][1] for r in runs)
        rows += [
            (f"batch {batch_size}: 1 process x 2 threads, s/epoch and images/s", f"{s1:.1f} s, {r1:,.0f}"),
            (f"batch {batch_size}: torchrun 2 processes x 1 thread, s/epoch and images/s", f"{s2:.1f} s, {r2:,.0f}"),
            (f"batch {batch_size}: speed-up, 2 processes / 1 process, same run", f"{ratio:.2f}x"),
        ]
    return rows


def factor_rows(data_dir: str, repeats: int) -> list[tuple[str, str]]:
    """(g): ours against the reference post one change at a time, interleaved, each ratio a median of `repeats`."""
    cfg = Config()
    splits = load_splits(data_dir, cfg.val_size, cfg.split_seed, download=False)
    from torchvision import transforms

    reference_data = ReferenceMNIST(
        splits["train"].images,
        splits["train"].labels,
        transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]),
    )
    n_images, at_64 = 12_800, replace(cfg, batch_size=64)
    steps = [
        ("reference post: PIL list, DataLoader, batch 64, contiguous", lambda: reference(reference_data, n_images)),
        (
            "tensor-resident, batch 64, contiguous",
            lambda: ours(splits["train"], at_64, n_images, torch.contiguous_format),
        ),
        ("tensor-resident, batch 64, channels-last", lambda: ours(splits["train"], at_64, n_images)),
        ("tensor-resident, batch 128, channels-last (train.py)", lambda: ours(splits["train"], cfg, n_images)),
    ]
    runs = [[measure() for _, measure in steps] for _ in range(repeats)]
    rows = [
        (f"train images/s, {name}", f"{statistics.median(r[i] for r in runs):,.0f}")
        for i, (name, _) in enumerate(steps)
    ]
    factors = [
        "tensor-resident data instead of PIL + DataLoader",
        "channels-last instead of contiguous tensors",
        "batch 128 instead of 64",
    ]
    rows += [
        (f"speed-up, {name}, same run", f"{statistics.median(r[i + 1] / r[i] for r in runs):.2f}x")
        for i, name in enumerate(factors)
    ]
    rows.append(
        (
            "speed-up, all three (train.py / reference post), same run",
            f"{statistics.median(r[3] / r[0] for r in runs):.2f}x",
        )
    )
    return rows


# --- (h) a busy machine -------------------------------------------------------------------


def busy_rows(data_dir: str, repeats: int) -> list[tuple[str, str]]:
    """(h): 1 thread against torch's default, idle and beside one spinning process per CPU, interleaved."""
    cfg = Config()
    splits = load_splits(data_dir, cfg.val_size, cfg.split_seed, download=False)
    default, cpus = torch.get_num_threads(), len(os.sched_getaffinity(0))

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)
        return ours(splits["train"], cfg, 6_400)

    rows = []
    for hogs in (0, cpus):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        try:
            runs = [(rate(1), rate(default)) for _ in range(repeats)]
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        where = "idle" if not hogs else f"beside {hogs} busy-looping processes"
        rows += [
            (f"{where}: train images/s, 1 thread", f"{statistics.median(r[0] for r in runs):,.0f}"),
            (f"{where}: train images/s, {default} threads", f"{statistics.median(r[1] for r in runs):,.0f}"),
            (
                f"{where}: speed-up, 1 thread / {default} threads, same run",
                f"{statistics.median(r[0] / r[1] for r in runs):.2f}x",
            ),
        ]
    torch.set_num_threads(default)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    parser.add_argument("--repeats", type=int, default=5, help="runs per throughput figure (median)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for time-to-accuracy and the default run")
    parser.add_argument(
        "--fast",
        nargs="*",
        default=["--epochs", "3"],
        help="train.py flags of the time-to-99%% recipe (default: --epochs 3)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--ddp", action="store_true", help="measure only 1 process against 2 under torchrun")
    parser.add_argument("--baseline", metavar="REV", help="measure only this version against git revision REV")
    parser.add_argument(
        "--factors", action="store_true", help="measure only the speed-up over the reference, factor by factor"
    )
    parser.add_argument("--busy", action="store_true", help="measure only 1 thread against the default, idle and busy")
    args = parser.parse_args()
    # Each call trains into a new folder of its own inside --out-dir (whole_run finds each run's best.pt there), so
    # that nothing already in --out-dir, an earlier call's runs or a user's, is read or removed.
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = Path(tempfile.mkdtemp(prefix=time.strftime("speed-%Y%m%d-%H%M%S-"), dir=args.out_dir))

    if args.busy:
        print_table(busy_rows(args.data_dir, args.repeats))
        return
    if args.factors:
        print_table(factor_rows(args.data_dir, args.repeats))
        return
    if args.baseline:
        print_table(baseline_rows(args.baseline, args.data_dir, args.out_dir, args.seeds))
        return
    if args.ddp:
        print_table(ddp_rows(args.data_dir, args.out_dir, args.repeats))
        return

    cfg = Config()
    splits = load_splits(args.data_dir, cfg.val_size, cfg.split_seed, download=False)
    from torchvision import transforms

    reference_data = ReferenceMNIST(
        splits["train"].images,
        splits["train"].labels,
        transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]),
    )
    rows = []

    n_images = 12_800
    runs = [
        (
            ours(splits["train"], cfg, n_images),
            reference(reference_data, n_images),
            ours(splits["train"], cfg, n_images, torch.contiguous_format),
        )
        for _ in range(args.repeats)
    ]
    ours_ips, ref_ips = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    ratio = statistics.median(r[0] / r[1] for r in runs)
    channels_last_gain = statistics.median(r[0] / r[2] for r in runs)
    peak, peak_how = peak_flops()
    flops = cnn_train_flops()
    rows += [
        (f"train images/s, ours (batch {cfg.batch_size}, channels-last)", f"{ours_ips:,.0f}"),
        ("train images/s, reference post (PIL list, DataLoader, batch 64)", f"{ref_ips:,.0f}"),
        ("speed-up, ours / reference (data, memory format and batch together)", f"{ratio:.2f}x"),
        ("speed-up, channels-last / contiguous (NCHW) tensors, same run", f"{channels_last_gain:.2f}x"),
        ("FLOPs per training image (from layer shapes)", f"{flops / 1e6:.2f} M"),
        (f"share of FP32 peak ({peak / 1e9:.0f} GFLOP/s = {peak_how})", f"{ours_ips * flops / peak:.1%}"),
    ]

    fast_cfg = parse_args(args.fast)
    seeds = [
        time_to_accuracy(splits, parse_args([*args.fast, "--seed", str(seed)]), 0.99) for seed in range(args.seeds)
    ]
    reached = [seconds for seconds, _, _ in seeds if seconds is not None]
    rows += [
        (
            f"time to 99.0% test accuracy ({' '.join(args.fast)}: batch {fast_cfg.batch_size}, lr {fast_cfg.lr}), "
            f"median of {args.seeds} seeds",
            f"{statistics.median(reached):.1f} s" if len(reached) * 2 > len(seeds) else "not reached",
        ),
        (
            "  per seed: seconds (epochs, test accuracy)",
            ", ".join(f"{'not reached' if s is None else f'{s:.1f}'} ({e}, {a:.2%})" for s, e, a in seeds),
        ),
    ]

    eval_ips = statistics.median(
        len(splits["test"])
        / timed(lambda: model_logits(build_model("cnn"), splits["test"].images, cfg.eval_batch_size))
        for _ in range(args.repeats)
    )
    rows.append((f"evaluation images/s (batch {cfg.eval_batch_size})", f"{eval_ips:,.0f}"))

    whole = [whole_run(args.data_dir, args.out_dir / f"default-seed{i}", i) for i in range(args.seeds)]
    rows += [
        (
            f"default `python train.py`: wall time, median of {args.seeds} seeds",
            f"{statistics.median(w['wall'] for w in whole):.1f} s",
        ),
        (
            "default `python train.py`: test accuracy, median (per seed)",
            f"{statistics.median(w['acc'] for w in whole):.2%} ({', '.join(format(w['acc'], '.2%') for w in whole)})",
        ),
        ("default `python train.py`: peak RSS", f"{max(w['rss'] for w in whole):,.0f} MiB"),
    ]

    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {cpu_name()}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def cpu_name() -> str:
    """The CPU's model and whether it has AVX-512, which doubles this net's training speed against AVX2."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    return f"{model}, {'AVX-512' if ' avx512f' in cpuinfo else 'AVX2' if ' avx2' in cpuinfo else 'no AVX2'}"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
