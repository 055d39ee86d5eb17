"""What augment.batch costs against the training step it runs in. Not part of the tests; run it by hand:

    python benchmarks/augment_cost.py                         # batch 128, the config's amounts
    python benchmarks/augment_cost.py --batch-size 256 --repeats 31

Times, interleaved so that the machine's load falls on all alike, blocks of training steps (forward,
backward and SGD, as train.py takes them) without and with augmentation, and augment.batch alone.
Prints the medians over the repeats and the cost as a fraction of a step, in wall time and in the
process's CPU time. On a shared machine the CPU time is the steadier of the two, with OMP_NUM_THREADS=1
(with more threads it counts their spinning too). The images are random normalised pixels: the
warp's cost does not depend on what the pixels show.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

import augment
from config import Config
from data import normalize
from model import MEMORY_FORMAT, build_model


def per_batch(fn, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per call of fn(step), over `steps` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        fn(step)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=Config().batch_size)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks of each kind; medians are reported")
    args = parser.parse_args()
    cfg = Config(augment=True)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch_size * 8, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)

    def images(step):  # a fresh batch each step, sliced and normalised as MNISTData.batches does
        first = step % 8 * args.batch_size
        return normalize(pixels[first : first + args.batch_size])

    model = build_model("cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def train_step(batch):
        loss = F.cross_entropy(model(batch.contiguous(memory_format=MEMORY_FORMAT)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    kinds = {
        "training step, no augmentation": lambda step: train_step(images(step)),
        "training step with augment.batch": lambda step: train_step(
            augment.batch(images(step), cfg, 0, step, len(labels))
        ),
        "augment.batch alone": lambda step: augment.batch(images(step), cfg, 0, step, len(labels)),
    }
    for fn in kinds.values():  # warm-up: oneDNN picks its kernels
        per_batch(fn, 3)
    times = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, fn in kinds.items():
            times[name].append(per_batch(fn, args.steps))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {cpu_name()}; "
        f"batch {args.batch_size}, rotate {cfg.aug_rotate}, scale {cfg.aug_scale}, shear {cfg.aug_shear}, "
        f"shift {cfg.aug_shift}; medians of {args.repeats} blocks of {args.steps} steps"
    )
    print(f"{'':<34} {'wall':>9} {'CPU':>9}")
    median = {}
    for name, values in times.items():
        median[name] = [statistics.median(clock) for clock in zip(*values)]  # [wall, cpu]
        print(f"{name:<34} " + " ".join(f"{seconds * 1e3:6.2f} ms" for seconds in median[name]))
    plain, with_aug, alone = (median[name] for name in kinds)
    print(f"{'augment.batch / training step':<34} " + " ".join(f"{a / p:9.1%}" for a, p in zip(alone, plain)))
    print(f"{'step with / step without':<34} " + " ".join(f"{w / p:9.3f}" for w, p in zip(with_aug, plain)))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")


if __name__ == "__main__":
    main()
