"""Train the CNN (or the FCNN baseline) on MNIST.

    python train.py                                   # defaults from config.py
    python train.py --epochs 3 --lr 0.05 --out-dir runs/exp1
    python train.py --out-dir runs/exp1 --resume      # continue an interrupted run

Reads top to bottom in the order it runs: config, output folder, device, seed, data,
model and SGD, the epoch loop (validation and checkpoints every epoch), then one test
evaluation of the best model.
"""
import contextlib
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
import plots
import rundir
from config import Config, UserError
from data import MNIST_MEAN, MNIST_STD, MNISTData, epoch_order, load_splits
from metrics import confusion_matrix, scores
from model import MEMORY_FORMAT, build_model, count_parameters, load_checkpoint, model_logits, save_checkpoint
from rundir import atomic_write

# Settings that --resume may change: they say where things are, how far to go, or how fast,
# not what is learned. Any other difference from the saved run is refused.
RESUMABLE_CHANGES = {"data_dir", "download", "out_dir", "run_name", "epochs", "eval_batch_size", "device", "compile", "resume",
                     "tensorboard", "log_every"}


class Diverged(UserError):
    """The loss became NaN or inf; main() exits 1 rather than 2, since no input was wrong."""


def pick_device(name: str) -> torch.device:
    """config.device as a torch.device; 'auto' takes the fastest that is there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU; use --device auto or --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps was asked for, but this torch has no Apple MPS; use --device auto or --device cpu")
    return torch.device(name)


def resume_config(saved: dict, argv) -> Config:
    """The saved run's config with this command line's flags on top; refuse flags that would change what is learned."""
    try:
        base = config.check(Config(**saved))
    except (TypeError, UserError) as e:
        raise UserError(f"last.pt holds a config this version cannot use ({e}); start a new run instead") from None
    cfg = config.parse_args(argv, base=base)
    changed = [f.name for f in fields(Config)
               if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(base, f.name)]
    if changed:
        diffs = ", ".join(f"{n} {getattr(base, n)!r} -> {getattr(cfg, n)!r}" for n in changed)
        raise UserError(f"cannot resume: the saved run differs in {diffs}; drop those flags, or start a new run without --resume")
    return cfg


def lr_factor(step: int, total_steps: int, schedule: str, warmup: float) -> float:
    """The fraction of the peak learning rate to use at optimiser step `step`."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(warmup * total_steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total_steps - step) / max(1, total_steps - warm))


def make_optimizer(model, cfg: Config, steps_per_epoch: int):
    """SGD with the config's settings, and its learning-rate schedule stepped once per batch over cfg.epochs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup))
    return optimizer, scheduler


def model_args(cfg: Config) -> dict:
    return {"hidden": cfg.fcnn_hidden} if cfg.model == "fcnn" else {}


def evaluate(model, split: MNISTData, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on a split."""
    return scores(model_logits(model, split.images, batch_size), split.labels)


def train_epoch(model, optimizer, scheduler, scaler, split, cfg, epoch, progress, stop_requested, writer) -> dict:
    """Run one epoch from batch progress["step"] on, stopping early when stop_requested(); return the new progress.

    Every cfg.log_every optimiser steps, the batch loss and learning rate go to `writer` (TensorBoard)."""
    model.train()
    device = split.labels.device
    order = epoch_order(len(split), cfg.seed, epoch, device)
    steps = math.ceil(len(split) / cfg.batch_size)
    # Running sums stay on the device, so the loop does not wait for the GPU at every step.
    loss_sum = torch.tensor(progress["loss_sum"], device=device)
    correct = torch.tensor(progress["correct"], device=device)
    seen, step = progress["seen"], progress["step"]
    autocast_dtype = amp_dtype(device)
    bar = tqdm(total=steps, initial=step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
    for images, labels in split.batches(cfg.batch_size, order, start=step):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=cfg.amp):
            logits = model(images.contiguous(memory_format=MEMORY_FORMAT))
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen, step = seen + len(labels), step + 1
        bar.update()
        if scheduler.last_epoch % cfg.log_every == 0:  # last_epoch counts optimiser steps, across epochs and resumes
            writer.add_scalar("step/loss", loss.item(), scheduler.last_epoch)
            writer.add_scalar("step/lr", scheduler.get_last_lr()[0], scheduler.last_epoch)
        if step % 25 == 0 or step == steps:
            check_finite(loss_sum, epoch)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}")
        if stop_requested():
            break
    bar.close()
    check_finite(loss_sum, epoch)
    return {"step": step, "loss_sum": loss_sum.item(), "correct": int(correct.item()), "seen": seen}


def check_finite(loss_sum: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss_sum):
        raise Diverged(f"training diverged in epoch {epoch + 1} (loss is NaN or inf), most likely the learning rate is "
                       f"too high; try a smaller --lr. The checkpoints from before are untouched")


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU has it (no loss scaling needed), float16 otherwise."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def sigint_requests():
    """Yield a function that says whether Ctrl-C was pressed. The first Ctrl-C lets the loop finish its
    step and save; a second one quits at once. The previous handler is restored on the way out."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        tqdm.write("stopping after this step to save last.pt (Ctrl-C again to quit without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


def train(cfg: Config, resumed=None, stop_requested=lambda: False) -> int:
    """Run the whole training job in its run folder; return the process exit code.

    A fresh run gets a new folder; `resumed` (load_checkpoint()'s (model, ckpt) of a run's last.pt)
    continues in the folder cfg.run_name names. The folder is locked for as long as the run writes.
    """
    run_dir = rundir.find_run(cfg.out_dir, cfg.run_name) if resumed else rundir.new_run_dir(cfg.out_dir, cfg.run_name, cfg.model)
    cfg = replace(cfg, out_dir=str(run_dir.parent), run_name=run_dir.name)
    with rundir.locked(run_dir):
        try:
            with contextlib.closing(tensorboard_writer(cfg, run_dir, resumed)) as writer:
                return fit(cfg, run_dir, resumed, stop_requested, writer)
        finally:
            if not resumed:
                rundir.remove_if_unused(run_dir)  # a run that failed before its first save leaves no empty folder


def tensorboard_writer(cfg: Config, run_dir: Path, resumed):
    """A SummaryWriter into the run folder, or a NoWriter when cfg.tensorboard is off.

    A resumed run hides the events that the interrupted one logged after its last.pt (purge_step),
    so its curves go on from there with no step twice."""
    if not cfg.tensorboard:
        return NoWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter  # about 1 s to import, so only when it is used
    except ImportError:
        raise UserError("tensorboard is not installed; pip install -r requirements.txt, or pass --no-tensorboard") from None
    # The saved state has taken last_epoch optimiser steps: what was logged at later steps is the lost future.
    return SummaryWriter(run_dir, purge_step=resumed[1]["scheduler"]["last_epoch"] + 1 if resumed else None)


class NoWriter:
    """Stands in for SummaryWriter when logging is off: every call does nothing, so the loop has no `if` for it."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def log_epoch(writer, row: dict, step: int, images: int) -> None:
    """The epoch's row of the table, as TensorBoard scalars at the optimiser step it ended on."""
    for split in ("train", "val"):
        writer.add_scalar(f"loss/{split}", row[f"{split}_loss"], step)
        writer.add_scalar(f"accuracy/{split}", row[f"{split}_acc"], step)
    writer.add_scalar("speed/epoch_seconds", row["seconds"], step)
    writer.add_scalar("speed/images_per_second", images / row["seconds"], step)
    writer.flush()  # so a killed run leaves every finished epoch readable


def log_test(writer, cfg: Config, run: dict, logits, test: MNISTData, step: int) -> None:
    """The test result, the config with the final metrics for the HParams tab, and the test figures."""
    (test_loss, test_acc), labels = scores(logits, test.labels), test.labels.cpu()
    writer.add_scalar("test/loss", test_loss, step)
    writer.add_scalar("test/accuracy", test_acc, step)
    hparams = {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "out_dir", "run_name", "resume")}
    writer.add_hparams(hparams, {"hparam/test_accuracy": test_acc, "hparam/test_loss": test_loss,
                                 "hparam/best_val_accuracy": run["best_val_acc"]}, run_name=".", global_step=step)
    if cfg.tensorboard:  # matplotlib figures cost about a second: draw them only for a real writer
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        title = f"{cfg.model}, test accuracy {test_acc:.2%}"
        writer.add_figure("test/confusion_matrix", plots.confusion_figure(
            confusion_matrix(labels, predicted.cpu()).numpy(), title), step)
        writer.add_figure("test/confident_mistakes", plots.mistakes_figure(
            test.images.cpu().numpy(), labels.tolist(), predicted.tolist(), confidence.tolist(), title), step)


def fit(cfg: Config, run_dir: Path, resumed, stop_requested, writer) -> int:
    """Seed, device, data, model and optimiser, the epoch loop, then the test evaluation; files go to run_dir."""
    device = pick_device(cfg.device)
    if cfg.amp and device.type != "cuda":
        raise UserError(f"--amp needs a CUDA GPU, and this run is on {device.type}; drop --amp")
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    print(f"run folder: {run_dir}")
    torch.manual_seed(cfg.seed)

    splits = {name: split.to(device) for name, split in
              load_splits(cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.download).items()}
    print(f"data: {len(splits['train'])} train, {len(splits['val'])} val, {len(splits['test'])} test images on {device}")

    model = (resumed[0] if resumed else build_model(cfg.model, **model_args(cfg))).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=math.ceil(len(splits["train"]) / cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    run = {"epoch": 0, "epoch_progress": new_progress(), "history": [], "best_epoch": 0, "best_val_acc": -1.0}
    if resumed:
        ckpt = resumed[1]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"].cpu())
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):  # --epochs may have stretched the schedule
            group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        run = {key: ckpt[key] for key in run}
        print(f"resuming from {run_dir / 'last.pt'}: epoch {run['epoch'] + 1}, step {run['epoch_progress']['step']}")
    net = torch.compile(model) if cfg.compile else model  # checkpoints are saved from `model`, never the compiled wrapper
    print(f"model: {cfg.model}, {count_parameters(model):,} parameters")

    def checkpoint() -> dict:
        return {
            "model": model.state_dict(), "model_name": cfg.model, "model_args": model_args(cfg),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "config": asdict(cfg), **run, "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
            "torch_version": str(torch.__version__), "rng": torch.get_rng_state(),
        }

    print_header()
    for epoch in range(run["epoch"], cfg.epochs):
        start = time.perf_counter()
        progress = train_epoch(net, optimizer, scheduler, scaler, splits["train"], cfg, epoch,
                               run["epoch_progress"], stop_requested, writer)
        if progress["seen"] < len(splits["train"]):  # stopped mid-epoch: save exactly where we are
            run["epoch_progress"] = progress
            save_checkpoint(checkpoint(), run_dir / "last.pt")
            return interrupted(cfg)
        val_loss, val_acc = evaluate(net, splits["val"], cfg.eval_batch_size)
        run["history"].append({
            "epoch": epoch + 1, "train_loss": progress["loss_sum"] / progress["seen"],
            "train_acc": progress["correct"] / progress["seen"], "val_loss": val_loss, "val_acc": val_acc,
            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start,
        })
        run["epoch"], run["epoch_progress"] = epoch + 1, new_progress()
        if val_acc > run["best_val_acc"]:
            run["best_epoch"], run["best_val_acc"] = epoch + 1, val_acc
            save_checkpoint(checkpoint(), run_dir / "best.pt")
        save_checkpoint(checkpoint(), run_dir / "last.pt")
        log_epoch(writer, run["history"][-1], scheduler.last_epoch, len(splits["train"]))
        print_row(run["history"][-1], best=run["best_epoch"] == epoch + 1)
        write_metrics(run_dir, run)
        if stop_requested():
            return interrupted(cfg)

    # One look at the test set, with the model that did best on validation.
    best, best_ckpt = load_checkpoint(run_dir / "best.pt", device)
    logits = model_logits(best, splits["test"].images, cfg.eval_batch_size)
    test_loss, test_acc = scores(logits, splits["test"].labels)
    best_ckpt.update(test_loss=test_loss, test_acc=test_acc)
    save_checkpoint(best_ckpt, run_dir / "best.pt")
    write_metrics(run_dir, {**run, "test_loss": test_loss, "test_acc": test_acc})
    plots.plot_curves({cfg.model: run["history"]}, run_dir / "curves.png")
    log_test(writer, cfg, run, logits, splits["test"], scheduler.last_epoch)
    print(f"test: loss {test_loss:.4f}, accuracy {test_acc:.2%} (best.pt, epoch {run['best_epoch']}, "
          f"val {run['best_val_acc']:.2%}); best.pt, last.pt, metrics.json and curves.png are in {run_dir}/")
    return 0


def new_progress() -> dict:
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0}


def interrupted(cfg: Config) -> int:
    where = "" if cfg.out_dir == Config().out_dir else f" --out-dir {shlex.quote(cfg.out_dir)}"
    print(f"interrupted; last.pt is saved. To continue: python train.py{where} --run-name {shlex.quote(cfg.run_name)} --resume",
          file=sys.stderr)
    return 130


def write_metrics(run_dir: Path, run: dict) -> None:
    keys = ("history", "best_epoch", "best_val_acc", "test_loss", "test_acc")
    atomic_write(run_dir / "metrics.json", json.dumps({k: run[k] for k in keys if k in run}, indent=2).encode())


COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def print_header() -> None:
    print(" ".join(f"{c:>10}" for c in COLUMNS))


def print_row(row: dict, best: bool) -> None:
    cells = [f"{row['epoch']:>10}", f"{row['train_loss']:>10.4f}", f"{row['train_acc']:>10.2%}",
             f"{row['val_loss']:>10.4f}", f"{row['val_acc']:>10.2%}", f"{row['lr']:>10.4f}", f"{row['seconds']:>10.1f}"]
    print(" ".join(cells) + ("  *best" if best else ""), flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.parse_args(argv)
        resumed = None
        if cfg.resume:
            run_dir = rundir.find_run(cfg.out_dir, cfg.run_name)
            resumed = load_checkpoint(run_dir / "last.pt")
            cfg = replace(resume_config(resumed[1]["config"], argv), out_dir=str(run_dir.parent), run_name=run_dir.name)
        with sigint_requests() as stop_requested:
            return train(cfg, resumed, stop_requested)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print("interrupted before anything new was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
