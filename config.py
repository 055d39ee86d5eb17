"""Every hyperparameter and path, in one place.

Edit the defaults below to change what `python train.py` does, or override any
field for one run from the command line: `--lr 0.05`, `--data-dir ../shared/data`,
`--no-nesterov`. The flags are generated from these fields, so there is no second
list of defaults, and every value is checked before any work starts.
"""

import argparse
import difflib
import gc
import math
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch


class UserError(Exception):
    """A mistake the user can fix. Entry points print it as one line, without a traceback."""


def opt(default, help, choices=None, low=None, high=None, positive=False):
    """A config field: its default, a one-line help text, and the values it allows."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high, positive=positive))


# data.epoch_order seeds a torch.Generator with seed * 100_003 + epoch, and torch takes seeds below 2**64 only:
# this bound (1.8e14) leaves room for 100,003 epochs.
SEED_HIGH = 2**64 // 100_003 - 1


@dataclass
class Config:
    # --- data ---
    data_dir: str = opt(
        "data", "folder with MNIST's 4 files (.gz or not), loose or in MNIST/raw/ (where a download goes)"
    )
    download: bool = opt(True, "download MNIST into data_dir when it is missing (--no-download to only read)")
    val_size: int = opt(5000, "training images held out for validation (1 to 59999)", low=1, high=59999)
    split_seed: int = opt(
        0,
        "seed of the train/validation split; fixed so every run validates on the same images",
        low=0,
        high=2**64 - 1,  # torch.Generator takes no more
    )

    # --- model ---
    model: str = opt(
        "cnn", "network to train: the post's two-conv 'cnn' or the fully connected 'fcnn'", choices=("cnn", "fcnn")
    )
    fcnn_hidden: int = opt(256, "hidden units of the fcnn baseline (784 -> hidden -> 10)", positive=True)

    # --- optimisation ---
    # Measured over seeds 0-2 (test accuracy, median, worst), by benchmarks/speed.py --baseline and a sweep:
    # 4 epochs at lr 0.1, weight decay 5e-4: 99.17%, 99.06%; at lr 0.15, weight decay 1.5e-3: 99.19%, 99.12%.
    # 2 epochs at lr 0.1, weight decay 5e-4: 98.98%, 98.73%; at lr 0.15, weight decay 1.5e-3: 99.09%, 98.98%.
    # 8 epochs at batch 256 gave no more (99.15%) for twice the time: on the unchanged images this net tops out
    # near 99.2%. With the augmentation below it goes on learning (benchmarks/augment_sweep.py, docs/augmentation.md),
    # at lr 0.15, weight decay 1.5e-3, warm-up 0.2: 8 epochs 99.44%, 99.34%; 7 epochs 99.35%, 99.31%. At 8 epochs,
    # weight decay 5e-4 gave 99.38%, 99.31%; lr 0.1 99.40%, 99.36%.
    # That recipe sat at the edge of stability: short runs (1 or 2 epochs, so a warm-up of 86 to 172 steps) died
    # at 11.35%, every image called a "1", in 5 of 12 runs, the thread count deciding which. One step too large,
    # when the lr peaks, switches off every ReLU. Clipping the gradient's norm at 2 (clip_grad_norm below) bounds
    # that step, and nothing else gives that margin: one epoch at twice the lr (0.3), seeds 0-3, died in 2 of 2
    # runs unclipped, 0 of 4 clipped at 1 or 2, 1 of 4 clipped at 3 or 5, and 3 of 4 with a warm-up of half the
    # run; a lower lr has less room (unclipped, 0.2, twice 0.1, died in 3 of 4). Clipping at 1 cost the 8-epoch
    # default 0.12 points (median 99.32%); at 2 it gave 99.43% against 99.44% unclipped, one test image
    # (1 thread, same session; docs/results.md, which also has benchmarks/recipe_sweep.py's table).
    epochs: int = opt(8, "passes over the training split", positive=True)
    batch_size: int = opt(
        128,
        "training batch size (the whole batch over all torchrun processes); 128 to 256 is fastest per image on CPU",
        positive=True,
    )
    eval_batch_size: int = opt(
        500, "validation/test batch size; 2000 was no faster and took 33 MB more memory", positive=True
    )
    lr: float = opt(
        0.15, "peak learning rate of SGD; twice it still trains when clipped (below), not unclipped", positive=True
    )
    momentum: float = opt(0.9, "SGD momentum (0 for plain SGD)", low=0.0, high=0.999)
    nesterov: bool = opt(True, "use Nesterov momentum (needs momentum > 0)")
    weight_decay: float = opt(
        1.5e-3, "L2 penalty applied by SGD; 5e-4 and 1e-3 did worse at 2 epochs, 2e-3 and 3e-3 no better", low=0.0
    )
    schedule: str = opt(
        "linear",
        "'linear': linear warm-up to lr, then linear decay to 0; 'constant': lr throughout",
        choices=("linear", "constant"),
    )
    warmup: float = opt(0.2, "fraction of all steps spent warming up (linear only)", low=0.0, high=1.0)
    clip_grad_norm: float = opt(
        2.0, "largest norm of the whole gradient at a step: a longer one is scaled down to it (0: no clipping)", low=0.0
    )

    # --- augmentation: a random affine per training image (augment.py); evaluation never augments ---
    # Over seeds 0-2 at 8 epochs (median, worst): these amounts 99.44%, 99.34%; with shear 10: 99.40%, 99.34%;
    # rotate 15, scale 0.15, shear 10, shift 3: 99.31%, 99.18%.
    augment: bool = opt(
        True, "warp each training image by its own random rotation, scale, shear and shift (--no-augment: as drawn)"
    )
    aug_rotate: float = opt(10.0, "largest rotation in degrees, either way", low=0.0, high=180.0)
    aug_scale: float = opt(0.1, "largest change of size, as a fraction: 0.1 scales by 0.9 to 1.1", low=0.0, high=0.9)
    aug_shear: float = opt(0.0, "largest horizontal shear in degrees, either way", low=0.0, high=60.0)
    aug_shift: float = opt(2.0, "largest shift in pixels, along each axis", low=0.0, high=14.0)

    # --- run ---
    seed: int = opt(
        0,
        "seed for weight initialisation and batch order; same seed, same weights on CPU with the same threads",
        low=0,
        high=SEED_HIGH,
    )
    device: str = opt(
        "auto", "'auto': torch's accelerator (cuda, mps, xpu, ...) when there is one, else cpu; or a device type"
    )
    amp: bool = opt(False, "bfloat16/float16 mixed precision (on an accelerator, not the CPU)")
    compile: bool = opt(False, "torch.compile the model (first epoch pays the compile time)")
    tensorboard: bool = opt(True, "log curves, hyperparameters and test figures for `tensorboard --logdir runs`")
    log_every: int = opt(
        50, "optimiser steps between two points of TensorBoard's step/loss and step/lr curves", positive=True
    )
    dist_timeout: int = opt(
        300, "under torchrun: seconds a process waits for the others before it gives up", positive=True
    )
    out_dir: str = opt("runs", "folder that holds one sub-folder per run (best.pt, last.pt, metrics.json, curves.png)")
    run_name: str = opt(
        "", "the run's sub-folder; empty: a new one named by start time and model, or with --resume the latest run"
    )
    resume: bool = opt(False, "continue the run named by --run-name (default: the latest run) from its last.pt")


def check(cfg: Config) -> Config:
    """Check every field's type and range, coercing ints to floats; raise UserError naming the first bad one."""
    for f in fields(cfg):
        value, meta, kind = getattr(cfg, f.name), f.metadata, f.type
        where = f"{f.name} (--{flag(f.name)})"
        if kind is float and type(value) is int:
            value = float(value)
            setattr(cfg, f.name, value)
        if type(value) is not kind:
            raise UserError(f"{where} must be {KIND_NAMES[kind]}, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise UserError(f"{where} must be one of {', '.join(meta['choices'])}; got {value!r}")
        if kind is float and not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        if meta["positive"] and not value > 0:
            raise UserError(f"{where} must be > 0, got {value!r}")
        if meta["low"] is not None and value < meta["low"]:
            raise UserError(f"{where} must be >= {meta['low']}, got {value!r}")
        if meta["high"] is not None and value > meta["high"]:
            raise UserError(f"{where} must be <= {meta['high']}, got {value!r}")
    if cfg.device != "auto":
        check_device_type(cfg.device)
    if cfg.run_name and (
        cfg.run_name in (".", "..") or cfg.run_name != cfg.run_name.strip() or set("/\\\0") & set(cfg.run_name)
    ):
        # The run folder is out_dir/run_name: a path here would write outside out_dir, or into a folder not made yet.
        raise UserError(
            f"run_name (--run-name) must be one folder name, such as exp1: no / or \\, not . or .., no spaces "
            f"at either end; got {cfg.run_name!r} (the folder goes in --out-dir)"
        )
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("nesterov needs momentum > 0: pass --momentum 0.9 or --no-nesterov")
    return cfg


def check_device_type(name: str) -> None:
    """Refuse a device that is not a type torch knows, such as 'cuda' or 'cpu' (whether it is there is checked later)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(
            f"device (--device) must be auto or a device type torch knows, such as cpu, cuda, mps or xpu; got {name!r}"
        ) from None
    if device.index is not None or name != device.type:
        raise UserError(
            f"device (--device) takes a device type without an index, such as {device.type!r}; under "
            f"torchrun each process takes the index of its LOCAL_RANK (or set CUDA_VISIBLE_DEVICES)"
        )


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_value(kind, text: str, name: str):
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{flag(name)} takes {KIND_NAMES[kind]}, got {text!r}") from None


def exit_script(code: int):
    """sys.exit(code) for a script whose main() has returned, without the garbage collections of Python's
    shutdown, while the OS frees the memory at once. One gc.collect() after `import torch` takes only 0.07 s
    (median of 9, 2 idle AMD EPYC cores; 0.13 s at load 5), but shutdown collects again as it clears each
    module and frees all that it finds. From sys.exit to the end of the process, median of 7 on the same
    idle machine: 0.57 s without gc.freeze() and 0.14 s with it after `import torch`, 0.48 and 0.14 s after
    predict.py's imports, 0.89 and 0.19 s after train.py's and an optimiser (at load 5, 0.6 to 1.1 s saved).
    Objects still in reference cycles are not finalised, so main() closes its files, locks and process group
    itself, as it does anyway."""
    gc.freeze()
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises UserError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UserError(message)


def parse_args(argv=None, base: Config | None = None) -> Config:
    """Build a Config from the defaults above (or `base`) and command-line overrides, then check it."""
    base = base or Config()
    parser = Parser(description="Train a CNN (or the FCNN baseline) on MNIST.", allow_abbrev=False)
    for f in fields(Config):
        text = f"{f.metadata['help']} (default: {getattr(base, f.name)})".replace(
            "%", "%%"
        )  # argparse formats help with %
        if f.type is bool:
            parser.add_argument(f"--{flag(f.name)}", action=argparse.BooleanOptionalAction, default=MISSING, help=text)
        else:
            choices = f.metadata["choices"]
            metavar = "{" + ",".join(choices) + "}" if choices else f.type.__name__.upper()
            parser.add_argument(f"--{flag(f.name)}", default=MISSING, metavar=metavar, help=text)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = [f"--{flag(f.name)}" for f in fields(Config)]
        bad = unknown[0].split("=")[0]
        if not bad.startswith("-"):
            raise UserError(f"unexpected argument {bad!r}; every setting is a flag such as --epochs 3 (see --help)")
        close = difflib.get_close_matches(bad, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown option {bad}{hint}; valid options: {' '.join(valid)}")
    values = asdict(base)
    for f in fields(Config):
        given = getattr(args, f.name)
        if given is not MISSING:
            values[f.name] = given if f.type is bool else _parse_value(f.type, given, f.name)
    return check(Config(**values))
