"""Which device a run trains on, through torch.accelerator: CUDA, ROCm, Apple MPS, Intel XPU or any other.

    python train.py                    # --device auto: the accelerator torch was built for, if one is there; else the CPU
    python train.py --device cpu       # or any device type torch knows: cuda, xpu, mps, ...

Under torchrun each process of a machine takes the accelerator of its LOCAL_RANK. config.py checks
that the type is one torch knows; this module checks that it is there.
"""

import torch

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
