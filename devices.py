"""Which device a run trains on, through torch.accelerator: CUDA, ROCm, Apple MPS, Intel XPU or any other.

    python train.py                    # --device auto: the accelerator torch was built for, if one is there; else the CPU
    python train.py --device cpu       # or any device type torch knows: cuda, xpu, mps, ...

Under torchrun each process of a machine takes the accelerator of its LOCAL_RANK. config.py checks
that the type is one torch knows; this module checks that it is there.
"""

import os
import statistics
import time

import torch
import torch.nn.functional as F

import distributed
from config import UserError


def accelerator() -> str | None:
    """The type of the accelerator torch sees on this machine ('cuda', 'mps', 'xpu', ...), or None."""
    found = torch.accelerator.current_accelerator(check_available=True)
    return found.type if found is not None else None


def pick_device(name: str) -> torch.device:
    """config.device as a torch.device: 'auto' is the accelerator when there is one, else the CPU.

    Under torchrun, an accelerator's index is the process's LOCAL_RANK, and it becomes the current device."""
    several, present = distributed.world_size() > 1, accelerator()
    if name == "auto":
        name = "cpu" if present is None or (present == "mps" and several) else present  # DDP has no backend for MPS
    if name == "cpu":
        return torch.device("cpu")
    if name != present:
        sees = f"its accelerator is {present}" if present else "it sees no accelerator"
        raise UserError(
            f"device {name} was asked for, but this torch has no {name} device ({sees}); "
            f"use --device auto or --device cpu"
        )
    if name == "mps" and several:
        raise UserError("torchrun cannot train on Apple MPS (DDP has no backend for it); pass --device cpu")
    if several:
        per_machine, count = distributed.local_world_size(), torch.accelerator.device_count()
        if per_machine > count:
            raise UserError(
                f"torchrun started {per_machine} processes on this machine, but it has only {count} {name} "
                f"device{'s' if count != 1 else ''}; pass --nproc-per-node {count}, or --device cpu"
            )
        torch.accelerator.set_device_index(distributed.local_rank())  # before the first collective on the device
    return torch.device(name, distributed.local_rank()) if several else torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device computes in it (no loss scaling needed); float16 on CUDA GPUs without it.

    A GPU older than Ampere (T4, V100) only emulates bfloat16, slowly, and is_bf16_supported() counts that
    unless told not to (including_emulation, in torch since 2.4)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


# Beside other busy processes, torch's threads wait for each other at every parallel step while the one they wait
# for has no core: on 2 busy AMD EPYC cores, 2 threads trained 11x slower than 1 (benchmarks/speed.py --busy). A
# load average would say the same only outside a container, which sees its host's, so this times what matters:
# one of training's convolutions with torch's threads and with one. Idle, 2 threads took 0.57 of 1 thread's time;
# beside two busy-looping processes, 3.3 times it. Slower than one thread on the same work means busy.
BUSY_RATIO = 1.0


def convolution_seconds(threads: int, repeats: int = 9) -> float:
    """Median seconds of a first-layer convolution over a training batch, at `threads` threads (then restored)."""
    before = torch.get_num_threads()
    images = torch.rand(256, 1, 28, 28).contiguous(memory_format=torch.channels_last)  # (B, 1, 28, 28)
    weight = torch.rand(10, 1, 5, 5)
    torch.set_num_threads(threads)
    try:
        F.conv2d(images, weight)  # the first call sets the kernel up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(images, weight)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def busy_cpu_note(device: torch.device) -> str | None:
    """One line that says the CPU's cores are busy and how to train faster, or None.

    Only for a CPU run at torch's own thread count: an OMP_NUM_THREADS the user (or torchrun) set is their choice."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    several, one = convolution_seconds(threads), convolution_seconds(1)
    if several < BUSY_RATIO * one:
        return None
    return (
        f"note: this CPU's cores are busy with other work ({threads} threads took {several / one:.1f}x as long as 1 "
        f"on a training step); OMP_NUM_THREADS=1 python train.py can train many times faster (docs/troubleshooting.md)"
    )
