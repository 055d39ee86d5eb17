"""Train the CNN (or the FCNN baseline) on MNIST, in one process or several.

    python train.py                                     # defaults from config.py, into a new folder in runs/
    python train.py --epochs 3 --lr 0.05 --run-name exp1
    python train.py --resume                            # continue the latest run
    torchrun --standalone --nproc-per-node 2 train.py   # the same training on 2 processes, with DDP

Reads top to bottom in the order it runs: config, run folder, device, seed, data, model and SGD,
the epoch loop (validation and checkpoints every epoch), then one test evaluation of the best
model. Under torchrun every process runs this same code on its share of each batch, and rank 0
alone prints and writes (distributed.py); one process is the case world_size == 1.
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

import augment
import config
import distributed
import plots
import rundir
from config import Config, UserError
from data import MNIST_MEAN, MNIST_STD, MNISTData, epoch_order, load_splits
from metrics import confusion_matrix, scores
from distributed import print0
from model import (MEMORY_FORMAT, build_model, count_parameters, load_checkpoint, model_logits, rebuild_model,
                   save_checkpoint)
from rundir import atomic_write

# Settings that --resume may change: they say where things are, how far to go, or how fast,
# not what is learned. Any other difference from the saved run is refused.
RESUMABLE_CHANGES = {"data_dir", "download", "out_dir", "run_name", "epochs", "eval_batch_size", "device", "compile", "resume",
                     "tensorboard", "log_every", "dist_timeout"}


class Diverged(UserError):
    """The loss became NaN or inf; main() exits 1 rather than 2, since no input was wrong."""


def pick_device(name: str) -> torch.device:
    """config.device as a torch.device; 'auto' takes the fastest that is there. Under torchrun, GPU LOCAL_RANK."""
    several = distributed.world_size() > 1
    if name == "auto":
        mps = torch.backends.mps.is_available() and not several  # DDP has no backend for MPS
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU; use --device auto or --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps was asked for, but this torch has no Apple MPS; use --device auto or --device cpu")
    if name == "mps" and several:
        raise UserError("torchrun cannot train on Apple MPS (DDP has no backend for it); pass --device cpu")
    return torch.device("cuda", distributed.local_rank()) if name == "cuda" else torch.device(name)


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
    """Mean cross-entropy and accuracy of `model` on a split. Under torchrun each rank scores its own share
    of the images and the sums are added, so every image counts once and every rank gets the same numbers."""
    part = distributed.shard(len(split))
    logits, labels = model_logits(model, split.images[part], batch_size), split.labels[part]
    loss_sum, correct = distributed.sum_all(F.cross_entropy(logits, labels, reduction="sum"),
                                            (logits.argmax(dim=1) == labels).sum())
    return loss_sum.item() / len(split), correct.item() / len(split)


def train_epoch(model, optimizer, scheduler, scaler, split, cfg, epoch, progress, stop_requested, writer) -> dict:
    """Run one epoch from batch progress["step"] on, stopping early when stop_requested(); return the new progress.

    Every cfg.log_every optimiser steps, the batch loss and learning rate go to `writer` (TensorBoard)."""
    model.train()
    device = split.labels.device
    rank, world = distributed.rank(), distributed.world_size()
    order = epoch_order(len(split), cfg.seed, epoch, device)
    steps = math.ceil(len(split) / cfg.batch_size)
    # This rank's running sums stay on the device, so the loop does not wait for the GPU at every step.
    # Rank 0 carries what the epoch had summed before a resume; the ranks' sums are added at the end.
    before = progress if distributed.is_main() else new_progress()
    loss_sum = torch.tensor(before["loss_sum"], device=device)
    correct = torch.tensor(before["correct"], device=device)
    seen, step = before["seen"], progress["step"]
    autocast_dtype = amp_dtype(device)
    bar = tqdm(total=steps, initial=step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=None if distributed.is_main() else True)
    for images, labels in split.batches(cfg.batch_size, order, start=step, rank=rank, world=world):
        batch_size = min(cfg.batch_size, len(split) - step * cfg.batch_size)  # the whole batch, over all ranks
        images = augment.batch(images, cfg, epoch, step, batch_size, rank, world)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=cfg.amp):
            logits = model(images.contiguous(memory_format=MEMORY_FORMAT))
            batch_loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        # DDP averages the ranks' gradients; scaled by world / batch_size, that average is the gradient of
        # the whole batch's mean loss, exactly as one process computes it, even when the ranks' shares differ.
        loss = batch_loss * (world / batch_size)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += batch_loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen, step = seen + len(labels), step + 1
        bar.update()
        if scheduler.last_epoch % cfg.log_every == 0:  # last_epoch counts optimiser steps, across epochs and resumes
            writer.add_scalar("step/loss", batch_loss.item() / len(labels), scheduler.last_epoch)
            writer.add_scalar("step/lr", scheduler.get_last_lr()[0], scheduler.last_epoch)
        if step % 25 == 0 or step == steps:
            check_finite(loss_sum, epoch, device)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}",
                            lr=f"{scheduler.get_last_lr()[0]:.4f}")
        # Every rank stops after the same step. Agreeing costs a collective, so several processes ask only
        # every few steps: at every step, 2 processes ran at 0.72x of one at batch 128 instead of 0.78x.
        if step % distributed.STOP_CHECK_EVERY == 0 and distributed.any_rank(stop_requested(), device):
            break
    bar.close()
    check_finite(loss_sum, epoch, device)
    loss_sum, correct, seen = distributed.sum_all(loss_sum, correct, torch.tensor(seen, device=device))
    return {"step": step, "loss_sum": loss_sum.item(), "correct": int(correct.item()), "seen": int(seen.item())}


def check_finite(loss_sum: torch.Tensor, epoch: int, device) -> None:
    """Raise Diverged on every rank if the loss is NaN or inf on any."""
    if distributed.any_rank(not torch.isfinite(loss_sum).item(), device):
        raise Diverged(f"training diverged in epoch {epoch + 1} (loss is NaN or inf), most likely the learning rate is "
                       f"too high; try a smaller --lr. The checkpoints from before are untouched")


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU has it (no loss scaling needed), float16 otherwise."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def stop_signals():
    """Yield a function that says whether Ctrl-C (SIGINT) or SIGTERM arrived. The handler only notes it:
    the loop asks at each step, saves last.pt and exits. SIGTERM is what SLURM, Kubernetes and torchrun
    send before they kill. A second signal quits at once, except under torchrun, which passes the
    terminal's Ctrl-C on a second time itself and kills its workers if they take too long."""
    requested = []

    def handler(signum, frame):
        if requested:
            if distributed.under_torchrun():
                return
            raise KeyboardInterrupt
        requested.append(signum)
        if distributed.is_main():
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step to save last.pt"
                       f"{'' if distributed.under_torchrun() else ' (Ctrl-C again to quit without saving)'}", file=sys.stderr)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def train(cfg: Config, resumed: dict | None = None, stop_requested=lambda: False) -> int:
    """Run the whole training job in its run folder; return the process exit code.

    A fresh run gets a new folder; `resumed` (a run's last.pt, as a checkpoint dict) continues in the
    folder cfg.run_name names. Rank 0 chooses the folder and holds its lock while the run writes.
    """
    with contextlib.ExitStack() as held:
        def claim() -> Path:
            run_dir = (rundir.find_run(cfg.out_dir, cfg.run_name) if resumed
                       else rundir.new_run_dir(cfg.out_dir, cfg.run_name, cfg.model))
            held.enter_context(rundir.locked(run_dir))
            if not resumed:  # a run that fails before its first save leaves no folder behind
                held.callback(rundir.remove_if_unused, run_dir)
            rundir.mark_job(run_dir, distributed.job_id())  # where torchrun's restarts of this job continue
            return run_dir

        run_dir = distributed.from_main(claim)
        cfg = replace(cfg, out_dir=str(run_dir.parent), run_name=run_dir.name)
        writer = held.enter_context(contextlib.closing(tensorboard_writer(cfg, run_dir, resumed)))
        return fit(cfg, run_dir, resumed, stop_requested, writer)


def tensorboard_writer(cfg: Config, run_dir: Path, resumed):
    """A SummaryWriter into the run folder, or a NoWriter when cfg.tensorboard is off or on ranks other than 0.

    A resumed run hides the events that the interrupted one logged after its last.pt (purge_step),
    so its curves go on from there with no step twice."""
    if not (cfg.tensorboard and distributed.is_main()):
        return NoWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported only when it is used
    except ImportError:
        raise UserError("tensorboard is not installed; pip install -r requirements.txt, or pass --no-tensorboard") from None
    # The saved state has taken last_epoch optimiser steps: what was logged at later steps is the lost future.
    return SummaryWriter(run_dir, purge_step=resumed["scheduler"]["last_epoch"] + 1 if resumed else None)


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
    """The test result (run's test_loss and test_acc), the config with the final metrics for the HParams tab,
    and the test figures drawn from the logits."""
    test_loss, test_acc, labels = run["test_loss"], run["test_acc"], test.labels.cpu()
    writer.add_scalar("test/loss", test_loss, step)
    writer.add_scalar("test/accuracy", test_acc, step)
    hparams = {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "out_dir", "run_name", "resume")}
    writer.add_hparams(hparams, {"hparam/test_accuracy": test_acc, "hparam/test_loss": test_loss,
                                 "hparam/best_val_accuracy": run["best_val_acc"]}, run_name=".", global_step=step)
    if cfg.tensorboard:  # drawing the figures takes about 0.4 s: only for a real writer
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        title = f"{cfg.model}, test accuracy {test_acc:.2%}"
        writer.add_figure("test/confusion_matrix", plots.confusion_figure(
            confusion_matrix(labels, predicted.cpu()).numpy(), title), step)
        writer.add_figure("test/confident_mistakes", plots.mistakes_figure(
            test.images.cpu().numpy(), labels.tolist(), predicted.tolist(), confidence.tolist(), title), step)


def fit(cfg: Config, run_dir: Path, resumed, stop_requested, writer) -> int:
    """Seed, device, data, model and optimiser, the epoch loop, then the test evaluation; files go to run_dir."""
    device, world = pick_device(cfg.device), distributed.world_size()
    if cfg.amp and device.type != "cuda":
        raise UserError(f"--amp needs a CUDA GPU, and this run is on {device.type}; drop --amp")
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} is the whole batch of all {world} processes and must split evenly "
                        f"among them; pass a --batch-size that {world} divides")
    print0("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    print0(f"run folder: {run_dir}")
    print0(f"device: {device}, {world} process{'es' if world > 1 else ''} x {torch.get_num_threads()} threads")
    torch.manual_seed(cfg.seed)

    splits = distributed.node_first(lambda: load_splits(cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.download))
    splits = {name: split.to(device) for name, split in splits.items()}
    print0(f"data: {len(splits['train'])} train, {len(splits['val'])} val, {len(splits['test'])} test images")

    model = (rebuild_model(resumed, run_dir / "last.pt") if resumed else build_model(cfg.model, **model_args(cfg))).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=math.ceil(len(splits["train"]) / cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    run = {"epoch": 0, "epoch_progress": new_progress(), "history": [], "best_epoch": 0, "best_val_acc": -1.0}
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["rng"].cpu())
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):  # --epochs may have stretched the schedule
            group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        run = {key: resumed[key] for key in run}
        print0(f"resuming from {run_dir / 'last.pt'}: epoch {run['epoch'] + 1}, step {run['epoch_progress']['step']}")
    net = distributed.wrap(model, device)  # checkpoints are saved from `model`, never the DDP or compiled wrapper
    net = torch.compile(net) if cfg.compile else net
    print0(f"model: {cfg.model}, {count_parameters(model):,} parameters")

    def save(*names: str) -> None:
        if distributed.is_main():  # one voice: rank 0 writes, the others hold the same state
            ckpt = {
                "model": model.state_dict(), "model_name": cfg.model, "model_args": model_args(cfg),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "config": asdict(cfg), **run, "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
                "torch_version": str(torch.__version__), "rng": torch.get_rng_state(), "world_size": world,
            }
            for name in names:
                save_checkpoint(ckpt, run_dir / name)

    print_header()
    for epoch in range(run["epoch"], cfg.epochs):
        start = time.perf_counter()
        progress = train_epoch(net, optimizer, scheduler, scaler, splits["train"], cfg, epoch,
                               run["epoch_progress"], stop_requested, writer)
        if progress["seen"] < len(splits["train"]):  # stopped mid-epoch: save exactly where we are
            run["epoch_progress"] = progress
            save("last.pt")
            return interrupted(cfg)
        val_loss, val_acc = evaluate(model, splits["val"], cfg.eval_batch_size)  # the same numbers on every rank
        run["history"].append({
            "epoch": epoch + 1, "train_loss": progress["loss_sum"] / progress["seen"],
            "train_acc": progress["correct"] / progress["seen"], "val_loss": val_loss, "val_acc": val_acc,
            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start,
        })
        run["epoch"], run["epoch_progress"] = epoch + 1, new_progress()
        if val_acc > run["best_val_acc"]:
            run["best_epoch"], run["best_val_acc"] = epoch + 1, val_acc
            save("best.pt")
        save("last.pt")
        if distributed.is_main():
            write_metrics(run_dir, run)
        log_epoch(writer, run["history"][-1], scheduler.last_epoch, len(splits["train"]))
        print_row(run["history"][-1], best=run["best_epoch"] == epoch + 1)
        if distributed.any_rank(stop_requested(), device):
            return interrupted(cfg)

    if not distributed.is_main():
        return 0
    # One look at the test set, with the model that did best on validation (on rank 0 alone: it is quick).
    best, best_ckpt = load_checkpoint(run_dir / "best.pt", device)
    logits = model_logits(best, splits["test"].images, cfg.eval_batch_size)
    test_loss, test_acc = scores(logits, splits["test"].labels)
    best_ckpt.update(test_loss=test_loss, test_acc=test_acc)
    save_checkpoint(best_ckpt, run_dir / "best.pt")
    run.update(test_loss=test_loss, test_acc=test_acc)
    write_metrics(run_dir, run)
    plots.plot_curves({cfg.model: run["history"]}, run_dir / "curves.png")
    log_test(writer, cfg, run, logits, splits["test"], scheduler.last_epoch)
    print(f"test: loss {test_loss:.4f}, accuracy {test_acc:.2%} (best.pt, epoch {run['best_epoch']}, "
          f"val {run['best_val_acc']:.2%}); best.pt, last.pt, metrics.json and curves.png are in {run_dir}/")
    return 0


def new_progress() -> dict:
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0}


def interrupted(cfg: Config) -> int:
    where = "" if cfg.out_dir == Config().out_dir else f" --out-dir {shlex.quote(cfg.out_dir)}"
    command = f"python train.py{where} --run-name {shlex.quote(cfg.run_name)} --resume"
    also = " (or the same under torchrun, with any number of processes)" if distributed.under_torchrun() else ""
    print0(f"interrupted; last.pt is saved. To continue: {command}{also}", file=sys.stderr)
    return 130


def write_metrics(run_dir: Path, run: dict) -> None:
    keys = ("history", "best_epoch", "best_val_acc", "test_loss", "test_acc")
    atomic_write(run_dir / "metrics.json", json.dumps({k: run[k] for k in keys if k in run}, indent=2).encode())


COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def print_header() -> None:
    print0(" ".join(f"{c:>10}" for c in COLUMNS))


def print_row(row: dict, best: bool) -> None:
    cells = [f"{row['epoch']:>10}", f"{row['train_loss']:>10.4f}", f"{row['train_acc']:>10.2%}",
             f"{row['val_loss']:>10.4f}", f"{row['val_acc']:>10.2%}", f"{row['lr']:>10.4f}", f"{row['seconds']:>10.1f}"]
    print0(" ".join(cells) + ("  *best" if best else ""), flush=True)


def resume_point(cfg: Config, argv) -> tuple[Config, dict | None]:
    """The config and last.pt to continue from, or (cfg, None) to start afresh. Runs on rank 0 alone.

    --resume continues the named or the latest run. A process group that torchrun restarted after
    losing a worker continues this job's own run, found by torchrun's job id, with no flag needed."""
    if distributed.restarts():
        run_dir = rundir.job_run(cfg.out_dir, distributed.job_id())
        if run_dir is None or not (run_dir / "last.pt").is_file():  # lost before the first save: start again
            return replace(cfg, run_name=run_dir.name if run_dir else cfg.run_name), None
        print(f"torchrun restarted this job (restart {distributed.restarts()}): continuing {run_dir}")
    else:
        run_dir = rundir.find_run(cfg.out_dir, cfg.run_name)
    _, ckpt = load_checkpoint(run_dir / "last.pt")  # checks the weights fit before any process uses them
    cfg = replace(resume_config(ckpt["config"], argv), out_dir=str(run_dir.parent), run_name=run_dir.name)
    return cfg, ckpt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.parse_args(argv)
        use_cuda = pick_device(cfg.device).type == "cuda"
        with distributed.process_group(use_cuda, cfg.dist_timeout), stop_signals() as stop_requested:
            resumed = None
            if cfg.resume or distributed.restarts():
                cfg, resumed = distributed.from_main(lambda: resume_point(cfg, argv))
            return train(cfg, resumed, stop_requested)
    except UserError as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print0("interrupted before anything new was saved", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        # Another process died or hung. torchrun names it, and restarts the group if --max-restarts allows.
        reason = " ".join(str(e).split())[:160]
        print(f"error: process {distributed.rank()} lost the other processes of this run ({reason})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
