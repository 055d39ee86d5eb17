"""Train the CNN (or the FCNN baseline) on MNIST, in one process or several.

    python train.py                                     # defaults from config.py, into a new folder in runs/
    python train.py --epochs 3 --lr 0.05 --run-name exp1
    python train.py --resume                            # continue the latest run
    torchrun --standalone --nproc-per-node 2 train.py   # the same training on 2 processes, with DDP

Reads top to bottom in the order it runs: main() takes the config (and the saved run's, with --resume);
run() picks the device and the run folder; setup() seeds and builds the data, the model and SGD;
train_epochs() runs the epoch loop (validation and checkpoints every epoch); finish() tests the best
model once. Under torchrun every process runs this same code on its share of each batch, and rank 0
alone prints and writes (distributed.py); one process is the case world_size == 1.
"""

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import config
import distributed
import plots
import rundir
import tblog
from config import Config, UserError
from data import MNIST_MEAN, MNIST_STD, MNISTData, epoch_order, load_splits
from devices import amp_dtype, busy_cpu_note, pick_device
from distributed import print0
from metrics import scores
from model import (
    MEMORY_FORMAT,
    build_model,
    count_parameters,
    load_checkpoint,
    model_logits,
    read_checkpoint,
    rebuild_model,
    save_checkpoint,
)
from progress import Progress
from rundir import atomic_write

# Settings that --resume may change: they say where things are, how far to go, or how fast,
# not what is learned. Any other difference from the saved run is refused.
RESUMABLE_CHANGES = {
    "data_dir",
    "download",
    "out_dir",
    "run_name",
    "epochs",
    "eval_batch_size",
    "device",
    "amp",
    "compile",
    "resume",
    "tensorboard",
    "log_every",
    "dist_timeout",
}


# What --resume reads from last.pt, beyond the model: the optimiser's state and State.record's keys.
RESUME_KEYS = (
    "config",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "epoch_progress",
    "history",
    "best_epoch",
    "best_val_acc",
)


class Diverged(UserError):
    """Training failed: the loss became NaN or inf, or the network died. main() exits 1 rather than 2, since no
    input was wrong."""


@dataclass
class State:
    """Everything the epoch loop works on, built by setup(): one object instead of ten arguments."""

    cfg: Config
    run_dir: Path
    device: torch.device
    splits: dict[str, MNISTData]
    model: torch.nn.Module  # what checkpoints are saved from: never the DDP or compiled wrapper
    net: torch.nn.Module  # what trains: the model, wrapped for DDP and torch.compile as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    writer: "tblog.TensorBoard | tblog.NoLog"
    record: dict  # what the run has done: epoch, epoch_progress, history, best_epoch, best_val_acc (and the test)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.parse_args(argv)
        # The group serves CPU and accelerator tensors alike, so the device may still change with --resume.
        with distributed.process_group(cfg.dist_timeout), stop_signals() as stop_requested:
            saved = None
            if cfg.resume or distributed.restarts():
                cfg, saved = distributed.from_main(lambda: resume_point(cfg, argv))
            return run(cfg, saved, stop_requested)
    except UserError as e:
        print0(f"error: {e}", file=sys.stderr)
        distributed.report_error(f"error: {e}")  # under torchrun, also in its failure report
        distributed.let_rank_0_say_it()
        return 1 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print0("interrupted before anything new was saved", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        # Another process died or hung. torchrun names it, and restarts the group if --max-restarts allows.
        reason = " ".join(str(e).split())[:160]
        line = f"error: process {distributed.rank()} lost the other processes of this run ({reason})"
        print(line, file=sys.stderr)
        distributed.report_error(line, mine=True)
        distributed.let_rank_0_say_it()  # rank 0 may be saying why it left
        return 1


def resume_point(cfg: Config, argv) -> tuple[Config, dict | None]:
    """The config and last.pt to continue from, or (cfg, None) to start afresh. Runs on rank 0 alone.

    --resume continues the named or the latest run, and refuses one that has finished. A process group that
    torchrun restarted after losing a worker continues this job's own run, found by torchrun's job id."""
    if distributed.restarts():
        run_dir = rundir.job_run(cfg.out_dir, distributed.job_id())
        if run_dir is None or not (run_dir / "last.pt").is_file():  # lost before the first last.pt: start again
            return replace(cfg, run_name=run_dir.name if run_dir else cfg.run_name), None
        print(f"torchrun restarted this job (restart {distributed.restarts()}): continuing {run_dir}")
    else:
        run_dir = rundir.find_run(cfg.out_dir, cfg.run_name)
    # Checks the weights fit, and that the file holds what resuming reads, before any process uses it.
    _, saved = load_checkpoint(run_dir / "last.pt", needs=RESUME_KEYS)
    cfg = replace(resume_config(saved["config"], argv), out_dir=str(run_dir.parent), run_name=run_dir.name)
    done, step = saved["epoch"], saved["epoch_progress"]["step"]
    if cfg.epochs < done + (step > 0):  # the run would train nothing, drop a partly trained epoch, and be tested
        trained = f"{done} epoch{'s' * (done != 1)}" + (f" and {step} steps of epoch {done + 1}" if step else "")
        planned = saved["config"]["epochs"]
        raise UserError(
            f"run {run_dir} has trained {trained}, more than --epochs {cfg.epochs}, which would "
            f"{'drop those steps' if step else 'train nothing'} and test it; to train on, pass --epochs N with "
            f"N > {done}{f', or leave --epochs out to finish its {planned}' if planned > done else ''}"
        )
    best = run_dir / "best.pt"
    finished = saved["epoch"] >= cfg.epochs and best.is_file() and "test_acc" in read_checkpoint(best)
    if finished and not distributed.restarts():  # a restarted group finishes its job again, to end with exit code 0
        raise UserError(
            f"run {run_dir} is finished: it trained {'all ' * (saved['epoch'] > 1)}{saved['epoch']} "
            f"epoch{'s' * (saved['epoch'] != 1)} and was tested; to train "
            f"on, add --epochs N with N > {saved['epoch']} (the schedule stretches to the new end)"
        )
    return cfg, saved


def resume_config(saved: dict, argv) -> Config:
    """The saved run's config with this command line's flags on top; refuse flags that would change what is learned."""
    if saved.get("schedule") == "onecycle":  # the name of "linear" in checkpoints written before it was renamed
        saved = {**saved, "schedule": "linear"}
    saved = {"clip_grad_norm": 0.0, **saved}  # checkpoints written before clipping existed trained without it
    try:
        base = config.check(Config(**saved))
    except (TypeError, UserError) as e:
        raise UserError(f"last.pt holds a config this version cannot use ({e}); start a new run instead") from None
    cfg = config.parse_args(argv, base=base)
    changed = [
        f.name
        for f in fields(Config)
        if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(base, f.name)
    ]
    if changed:
        diffs = ", ".join(f"{n} {getattr(base, n)!r} -> {getattr(cfg, n)!r}" for n in changed)
        raise UserError(
            f"cannot resume: the saved run differs in {diffs}; drop those flags, or start a new run without --resume"
        )
    return cfg


def run(cfg: Config, saved: dict | None = None, stop_requested=lambda: False) -> int:
    """Run the whole training job in its run folder; return the process exit code.

    A fresh run gets a new folder; `saved` (a run's last.pt, as a checkpoint dict) continues in the
    folder cfg.run_name names. Rank 0 chooses the folder and holds its lock while the run writes.
    """
    device = pick_device(cfg.device)
    with contextlib.ExitStack() as held:

        def claim() -> Path:
            # A worker lost before this job's first last.pt leaves a folder (maybe with a best.pt): its restart
            # starts again in that folder, its own, rather than be refused as another run's.
            own = rundir.job_run(cfg.out_dir, distributed.job_id()) if distributed.restarts() else None
            if saved:
                run_dir = rundir.find_run(cfg.out_dir, cfg.run_name)
            else:
                run_dir = own or rundir.new_run_dir(cfg.out_dir, cfg.run_name, cfg.model)
            held.enter_context(rundir.locked(run_dir))
            print(f"run folder: {run_dir}")  # said once the folder is this run's
            if not saved:  # a run that fails before its first save leaves no folder behind, and says so
                held.callback(
                    lambda: (
                        rundir.remove_if_unused(run_dir)
                        and print(f"run folder {run_dir} removed: the run saved nothing")
                    )
                )
            rundir.mark_job(run_dir, distributed.job_id())  # where torchrun's restarts of this job continue
            held.enter_context(rundir.status_kept(run_dir, died=Diverged))  # running, then finished, stopped, died
            return run_dir

        run_dir = distributed.from_main(claim)
        cfg = replace(cfg, out_dir=str(run_dir.parent), run_name=run_dir.name)
        last_step = saved["scheduler"]["last_epoch"] if saved else None  # optimiser steps the saved state has taken
        writer = held.enter_context(
            contextlib.closing(tblog.open_writer(cfg, run_dir, last_step, distributed.is_main()))
        )
        state = setup(cfg, run_dir, device, saved, writer)
        if not train_epochs(state, stop_requested):
            return interrupted(cfg)
        if distributed.is_main():
            finish(state)
        return 0


def setup(cfg: Config, run_dir: Path, device: torch.device, saved: dict | None, writer) -> State:
    """Seed, data, model, optimiser and schedule, restored from `saved` when resuming; prints what it built."""
    world = distributed.world_size()
    if cfg.amp and device.type == "cpu":
        raise UserError("--amp needs a GPU or another accelerator, and this run is on the CPU; pass --no-amp")
    if cfg.batch_size % world:
        raise UserError(
            f"batch_size {cfg.batch_size} is the whole batch of all {world} processes and must split evenly "
            f"among them; pass a --batch-size that {world} divides"
        )
    print0("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    threads = torch.get_num_threads()
    print0(f"device: {device}, {world} process{'es' * (world > 1)} x {threads} thread{'s' * (threads > 1)}")
    if distributed.is_main() and (note := busy_cpu_note(device)):
        print(note)
    torch.manual_seed(cfg.seed)  # the weight initialisation; nothing draws from the global RNG after it

    splits = distributed.node_first(lambda: load_splits(cfg.data_dir, cfg.val_size, cfg.split_seed, cfg.download))
    splits = {name: split.to(device) for name, split in splits.items()}
    print0(f"data: {len(splits['train'])} train, {len(splits['val'])} val, {len(splits['test'])} test images")

    model = (rebuild_model(saved, run_dir / "last.pt") if saved else build_model(cfg.model, **model_args(cfg))).to(
        device
    )
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=math.ceil(len(splits["train"]) / cfg.batch_size))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype(device) == torch.float16)
    net = distributed.wrap(model, device)
    net = torch.compile(net) if cfg.compile else net
    record = {"epoch": 0, "epoch_progress": new_progress(), "history": [], "best_epoch": 0, "best_val_acc": -1.0}
    state = State(cfg, run_dir, device, splits, model, net, optimizer, scheduler, scaler, writer, record)
    if saved:
        restore(state, saved)
        print0(
            f"resuming from {run_dir / 'last.pt'}: epoch {record['epoch'] + 1}, step {record['epoch_progress']['step']}"
        )
    print0(f"model: {cfg.model}, {count_parameters(model):,} parameters")
    return state


def restore(state: State, saved: dict) -> None:
    """Continue from a saved last.pt: the optimiser, the schedule (stretched to cfg.epochs), the scaler, the record."""
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    for group, base_lr in zip(state.optimizer.param_groups, state.scheduler.base_lrs):  # --epochs may have stretched it
        group["lr"] = base_lr * state.scheduler.lr_lambdas[0](state.scheduler.last_epoch)
    if saved["scaler"]:  # a run without float16 loss scaling saved {}, which an enabled scaler cannot load
        state.scaler.load_state_dict(saved["scaler"])
    state.record.update({key: saved[key] for key in state.record})


def warmup_steps(total_steps: int, schedule: str, warmup: float) -> int:
    """How many optimiser steps the warm-up takes: 0 for a constant learning rate."""
    return 0 if schedule == "constant" else max(1, round(warmup * total_steps))


def lr_factor(step: int, total_steps: int, schedule: str, warmup: float) -> float:
    """The fraction of the peak learning rate to use at optimiser step `step`."""
    if schedule == "constant":
        return 1.0
    warm = warmup_steps(total_steps, schedule, warmup)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total_steps - step) / max(1, total_steps - warm))


def make_optimizer(model, cfg: Config, steps_per_epoch: int):
    """SGD with the config's settings, and its learning-rate schedule stepped once per batch over cfg.epochs."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.schedule, cfg.warmup)
    )
    return optimizer, scheduler


def model_args(cfg: Config) -> dict:
    return {"hidden": cfg.fcnn_hidden} if cfg.model == "fcnn" else {}


def train_epochs(state: State, stop_requested) -> bool:
    """The epoch loop, from the saved epoch to cfg.epochs: train, validate, save, log, print a row.

    Returns True when every epoch is done, False when stop_requested() stopped it (last.pt is saved)."""
    cfg, record, train_split = state.cfg, state.record, state.splits["train"]
    warm = warmup_steps(cfg.epochs * math.ceil(len(train_split) / cfg.batch_size), cfg.schedule, cfg.warmup)
    if record["epoch"] < cfg.epochs:
        print_header()
    for epoch in range(record["epoch"], cfg.epochs):
        # The clock goes on from the time a resumed epoch had already taken, so that its seconds, and its images
        # per second, are the whole epoch's (a last.pt saved before "seconds" was kept counts from the resume).
        start = time.perf_counter() - record["epoch_progress"].get("seconds", 0.0)
        progress = train_epoch(state, epoch, stop_requested)
        if progress["seen"] < len(train_split):  # stopped mid-epoch: save exactly where we are
            record["epoch_progress"] = {**progress, "seconds": time.perf_counter() - start}
            save(state, "last.pt")
            return False
        val_loss, val_acc = validate(state.model, state.splits["val"], cfg.eval_batch_size)  # the same on every rank
        record["history"].append(
            {
                "epoch": epoch + 1,
                "train_loss": progress["loss_sum"] / progress["seen"],
                "train_acc": progress["correct"] / progress["seen"],
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": state.scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - start,
            }
        )
        record["epoch"], record["epoch_progress"] = epoch + 1, new_progress()
        if val_acc > record["best_val_acc"]:
            record["best_epoch"], record["best_val_acc"] = epoch + 1, val_acc
            save(state, "best.pt")
        save(state, "last.pt")
        if distributed.is_main():
            write_metrics(state.run_dir, record)
        state.writer.epoch(record["history"][-1], state.scheduler.last_epoch, len(train_split))
        print_row(record["history"][-1], best=record["best_epoch"] == epoch + 1)
        if state.scheduler.last_epoch >= warm:  # a dead run stops here, its epoch saved as it is
            train_acc = record["history"][-1]["train_acc"]  # read too: a tiny val set can be all wrong in a live run
            check_learning(val_acc, val_loss, f"validation after epoch {epoch + 1}", cfg, state.run_dir, train_acc)
        if distributed.any_rank(stop_requested(), state.device):
            return False
    return True


def train_epoch(state: State, epoch: int, stop_requested) -> dict:
    """Run one epoch from batch record["epoch_progress"]["step"] on, stopping early when stop_requested();
    return the new progress. Every cfg.log_every optimiser steps, the batch's loss and the learning rate are logged."""
    cfg, split, device, scheduler = state.cfg, state.splits["train"], state.device, state.scheduler
    state.net.train()
    rank, world = distributed.rank(), distributed.world_size()
    order = epoch_order(len(split), cfg.seed, epoch, device)
    steps = math.ceil(len(split) / cfg.batch_size)
    # This rank's running sums stay on the device, so the loop does not wait for the GPU at every step.
    # Rank 0 carries what the epoch had summed before a resume; the ranks' sums are added at the end.
    before = state.record["epoch_progress"] if distributed.is_main() else new_progress()
    loss_sum = torch.tensor(before["loss_sum"], device=device)
    correct = torch.tensor(before["correct"], device=device)
    seen, step = before["seen"], state.record["epoch_progress"]["step"]
    autocast_dtype = amp_dtype(device)
    bar = Progress(steps, step, f"epoch {epoch + 1}/{cfg.epochs}", enabled=distributed.is_main())
    for images, labels in split.batches(cfg.batch_size, order, start=step, rank=rank, world=world):
        # This rank's share may be empty: the last batch can hold fewer images than there are processes.
        batch_size = min(cfg.batch_size, len(split) - step * cfg.batch_size)  # the whole batch, over all ranks
        images = augment.batch(images, cfg, epoch, step, batch_size, rank, world)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=cfg.amp):
            logits = state.net(images.contiguous(memory_format=MEMORY_FORMAT))
            batch_loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        # DDP averages the ranks' gradients; scaled by world / batch_size, that average is the gradient of
        # the whole batch's mean loss, exactly as one process computes it, even when the ranks' shares differ.
        loss = batch_loss * (world / batch_size)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.clip_grad_norm:  # DDP has averaged the ranks' gradients, so every rank clips the same gradient
            state.scaler.unscale_(state.optimizer)  # the true gradient, when float16 loss scaling is on
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad_norm)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        scheduler.step()
        loss_sum += batch_loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen, step = seen + len(labels), step + 1
        if scheduler.last_epoch % cfg.log_every == 0:  # last_epoch counts optimiser steps, across epochs and resumes
            # The whole batch's mean loss, summed over the ranks' shares: what one process would log.
            (whole_batch_loss,) = distributed.sum_all(batch_loss)
            state.writer.step(whole_batch_loss.item() / batch_size, scheduler.get_last_lr()[0], scheduler.last_epoch)
        if step % 25 == 0 or step == steps:
            check_finite(loss_sum, epoch, device)
            bar.set_postfix(
                loss=f"{loss_sum.item() / max(seen, 1):.4f}",
                acc=f"{correct.item() / max(seen, 1):.2%}",
                lr=f"{scheduler.get_last_lr()[0]:.4f}",
            )
        bar.update()  # after the figures, so that a plain progress line shows this step's
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
        raise Diverged(
            f"training diverged in epoch {epoch + 1} (loss is NaN or inf), most likely the learning rate is "
            f"too high; try a smaller --lr. The checkpoints from before are untouched"
        )


# A network that has died predicts one digit for every image: about 10% right, its loss near ln 10 = 2.30.
# A live one is far above twice that once its warm-up is over, even the tests' one-epoch runs on 500 images.
CHANCE_LEVEL = 0.2


def check_learning(
    accuracy: float, loss: float, where: str, cfg: Config, run_dir: Path, train_accuracy: float = 0.0
) -> None:
    """Raise Diverged if `accuracy` (the same on every rank) is near chance, and so is the epoch's `train_accuracy`
    when given: the run is dead, and says how to fix it. A few validation images (--val-size 1) can all be wrong in
    a run that learns, but a dead network is near chance on the tens of thousands it trained on as well."""
    if accuracy >= CHANCE_LEVEL or train_accuracy >= CHANCE_LEVEL:
        return
    clip = "" if cfg.clip_grad_norm else ", and turn on --clip-grad-norm 1"
    trained = f" (on its training images this epoch {train_accuracy:.2%})" if train_accuracy else ""
    raise Diverged(
        f"training is stuck at chance level: {where} the accuracy is {accuracy:.2%}{trained} and the loss {loss:.4f} "
        f"(guessing gives 10% and ln 10 = 2.3026), so the network most likely died in one too large step; "
        f"try a smaller --lr (such as {cfg.lr / 2:g}) or a longer --warmup{clip}. Its checkpoints are as it "
        f"left them, in {run_dir}/"
    )


def validate(model, split: MNISTData, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on a split. Under torchrun each rank scores its own share
    of the images and the sums are added, so every image counts once and every rank gets the same numbers."""
    part = distributed.shard(len(split))
    logits, labels = model_logits(model, split.images[part], batch_size), split.labels[part]
    loss_sum, correct = distributed.sum_all(
        F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(dim=1) == labels).sum()
    )
    return loss_sum.item() / len(split), correct.item() / len(split)


def save(state: State, *names: str) -> None:
    """Write the run's state as checkpoint files in its folder; rank 0 alone writes, the others hold the same state."""
    if not distributed.is_main():
        return
    cfg = state.cfg
    ckpt = {
        "model": state.model.state_dict(),
        "model_name": cfg.model,
        "model_args": model_args(cfg),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "config": asdict(cfg),
        **state.record,
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
        "torch_version": str(torch.__version__),
        "world_size": distributed.world_size(),
    }
    for name in names:
        save_checkpoint(ckpt, state.run_dir / name)


def finish(state: State) -> None:
    """One look at the test set, with the model that did best on validation (on rank 0 alone: it is quick)."""
    cfg, record, run_dir, test = state.cfg, state.record, state.run_dir, state.splits["test"]
    best, best_ckpt = load_checkpoint(run_dir / "best.pt", state.device)
    logits = model_logits(best, test.images, cfg.eval_batch_size)
    test_loss, test_acc = scores(logits, test.labels)
    check_learning(test_acc, test_loss, "on the test set, with best.pt,", cfg, run_dir)  # never a chance-level "test:"
    best_ckpt.update(test_loss=test_loss, test_acc=test_acc)
    save_checkpoint(best_ckpt, run_dir / "best.pt")
    record.update(test_loss=test_loss, test_acc=test_acc)
    write_metrics(run_dir, record)
    plots.plot_curves({cfg.model: record["history"]}, run_dir / "curves.png")
    state.writer.test(record, logits, test.images, test.labels, state.scheduler.last_epoch)
    rundir.write_status(run_dir, "finished")
    print(
        f"test: loss {test_loss:.4f}, accuracy {test_acc:.2%} (best.pt, epoch {record['best_epoch']}, "
        f"val {record['best_val_acc']:.2%}); best.pt, last.pt, metrics.json and curves.png are in {run_dir}/"
    )


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
            tqdm.write(
                f"{signal.Signals(signum).name}: stopping after this step to save last.pt"
                f"{'' if distributed.under_torchrun() else ' (Ctrl-C again to quit without saving)'}",
                file=sys.stderr,
            )

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def new_progress() -> dict:
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def interrupted(cfg: Config) -> int:
    where = "" if cfg.out_dir == Config().out_dir else f" {rundir.flag('--out-dir', cfg.out_dir)}"
    command = f"python train.py{where} {rundir.flag('--run-name', cfg.run_name)} --resume"
    also = " (or the same under torchrun, with any number of processes)" if distributed.under_torchrun() else ""
    print0(f"interrupted; last.pt is saved. To continue: {command}{also}", file=sys.stderr)
    return 130


def write_metrics(run_dir: Path, record: dict) -> None:
    keys = ("history", "best_epoch", "best_val_acc", "test_loss", "test_acc")
    atomic_write(run_dir / "metrics.json", json.dumps({k: record[k] for k in keys if k in record}, indent=2).encode())


COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def print_header() -> None:
    print0(" ".join(f"{c:>10}" for c in COLUMNS))


def print_row(row: dict, best: bool) -> None:
    cells = [
        f"{row['epoch']:>10}",
        f"{row['train_loss']:>10.4f}",
        f"{row['train_acc']:>10.2%}",
        f"{row['val_loss']:>10.4f}",
        f"{row['val_acc']:>10.2%}",
        f"{row['lr']:>10.4f}",
        f"{row['seconds']:>10.1f}",
    ]
    print0(" ".join(cells) + ("  *best" if best else ""), flush=True)


if __name__ == "__main__":
    config.exit_script(main())
