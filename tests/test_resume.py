"""--resume and torchrun's restarts at their edges: finished runs, folders in use, saved scaler state, changed
precision, old schedule names, a worker lost between two saves (issue 19, bugs 4, 5, 6, 8, 9 and 11)."""

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_post_hook

import distributed
import rundir
import train
from config import parse_args
from conftest import ROOT, copy_run, fast_args, one_line_error, run_flags
from model import build_model, load_checkpoint, save_checkpoint


def files(folder: Path) -> dict:
    """Every file in a folder, with its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


STEPS_PER_EPOCH = 10  # fast_args: 500 training images in batches of 50


def stopped_run(mnist_dir, run_dir: Path, epochs: int, after_epochs: int, steps: int) -> dict:
    """A run of `epochs` stopped, as Ctrl-C stops it, after `steps` optimiser steps of the epoch that follows
    `after_epochs` (steps=0: at the end of epoch `after_epochs`); its last.pt."""
    asked = iter(range(1, 1000))
    stop_at = after_epochs * (STEPS_PER_EPOCH + 1) + steps  # the loop asks after each step and each epoch's save
    cfg = parse_args(fast_args(mnist_dir, run_dir, "--epochs", epochs))
    assert train.run(cfg, stop_requested=lambda: next(asked) == stop_at) == 130
    return load_checkpoint(run_dir / "last.pt")[1]


@pytest.mark.parametrize(
    "epochs, after_epochs, steps, message",
    [
        (
            3,
            2,
            0,
            "2 epochs, more than --epochs 1, which would train nothing and test it; to train on, pass "
            "--epochs N with N > 2, or leave --epochs out to finish its 3",
        ),
        (
            2,
            1,
            5,
            "1 epoch and 5 steps of epoch 2, more than --epochs 1, which would drop those steps and test it; "
            "to train on, pass --epochs N with N > 1, or leave --epochs out to finish its 2",
        ),
    ],
)
def test_resuming_with_fewer_epochs_than_trained_is_refused_and_touches_nothing(
    mnist_dir, tmp_path, run_main, epochs, after_epochs, steps, message
):
    """--resume --epochs N, where N is below the epochs trained (or ends before a partly trained one), would train
    nothing, drop what that epoch had learned, and test: it is refused in one line, with every file kept."""
    run_dir = tmp_path / "stopped"
    stopped_run(mnist_dir, run_dir, epochs, after_epochs, steps)
    before = files(run_dir)
    result = run_main(*run_flags(run_dir), "--resume", "--epochs", 1)
    assert one_line_error(result) == f"error: run {run_dir} has trained {message}"
    assert "epoch" not in result.stdout and files(run_dir) == before


@pytest.fixture
def clock(monkeypatch):
    """train.py's clock, moved on 10 s by every optimiser step and by nothing else: an epoch takes 10 s a step."""
    now = [0.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    hook = register_optimizer_step_post_hook(lambda *args: now.__setitem__(0, now[0] + 10))
    yield
    hook.remove()


def test_an_epoch_resumed_in_its_middle_counts_its_whole_time_and_images(mnist_dir, tmp_path, run_main, clock):
    """An epoch stopped half-way and resumed reports the seconds of all its steps, before and after the resume, and
    images per second over those seconds, in the history and in TensorBoard, as an epoch trained in one go does."""
    run_dir = tmp_path / "run"
    assert stopped_run(mnist_dir, run_dir, 2, after_epochs=1, steps=4)["epoch_progress"]["seconds"] == 4 * 10
    assert run_main(*run_flags(run_dir), "--resume").returncode == 0
    history = load_checkpoint(run_dir / "last.pt")[1]["history"]
    assert [row["seconds"] for row in history] == [STEPS_PER_EPOCH * 10] * 2
    reader = EventAccumulator(str(run_dir))
    reader.Reload()
    speed = {event.step: event.value for event in reader.Scalars("speed/images_per_second")}
    assert speed == {STEPS_PER_EPOCH * n: pytest.approx(500 / (STEPS_PER_EPOCH * 10)) for n in (1, 2)}


def test_resuming_a_finished_run_says_so_and_touches_nothing(trained_run, tmp_path, run_main):
    """--resume on a run that trained all its epochs and was tested says it is finished and how to train on
    (--epochs N), exits 2, and leaves every file in the folder as it was, adding none."""
    run_dir = copy_run(trained_run, tmp_path / "done")
    before = files(run_dir)
    result = run_main(*run_flags(run_dir), "--resume")
    message = one_line_error(result)
    assert message == (
        f"error: run {run_dir} is finished: it trained all 2 epochs and was tested; to train on, "
        f"add --epochs N with N > 2 (the schedule stretches to the new end)"
    )
    assert "epoch" not in result.stdout
    assert files(run_dir) == before
    assert run_main(*run_flags(run_dir), "--resume", "--epochs", 3).returncode == 0  # the advice works
    assert load_checkpoint(run_dir / "last.pt")[1]["epoch"] == 3


def test_a_run_stopped_after_its_last_epoch_but_before_the_test_resumes_to_the_test(trained_run, tmp_path, run_main):
    """A run whose last epoch was saved but whose best.pt was never tested is not finished: --resume tests it."""
    run_dir = copy_run(trained_run, tmp_path / "untested")
    best = load_checkpoint(run_dir / "best.pt")[1]
    del best["test_loss"], best["test_acc"]
    save_checkpoint(best, run_dir / "best.pt")
    result = run_main(*run_flags(run_dir), "--resume")
    assert result.returncode == 0, result.stderr
    assert "test: loss" in result.stdout and "test_acc" in load_checkpoint(run_dir / "best.pt")[1]


def test_resuming_a_folder_still_being_written_names_its_writer(tmp_path, run_main):
    """--resume into a run folder whose run holds its lock but has saved nothing yet names that run, not
    "nothing to resume"; once the lock is free it is nothing to resume again."""
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with rundir.locked(run_dir):  # as a run does from its start; a lock taken in this process is held all the same
        message = one_line_error(run_main(*run_flags(run_dir), "--resume"))
    assert message == (
        f"error: run {run_dir} is being written by train.py with PID {os.getpid()} on "
        f"{message.split(' on ')[1].split(' and has')[0]} and has no last.pt yet; wait for it to end, "
        f"or start a new run"
    )
    assert "nothing to resume" in one_line_error(run_main(*run_flags(run_dir), "--resume"))


def test_a_checkpoint_without_loss_scaling_resumes_where_the_scaler_is_on(trained_run, mnist_dir):
    """A last.pt saved with scaler state {} (no float16 loss scaling: the CPU, or bfloat16) restores into an enabled
    GradScaler, as a GPU without bfloat16 has; the scaler keeps its fresh state."""
    saved = load_checkpoint(trained_run / "last.pt")[1]
    assert saved["scaler"] == {}
    cfg = parse_args(fast_args(mnist_dir, "unused", "--epochs", 2))
    model = build_model("cnn")
    optimizer, scheduler = train.make_optimizer(model, cfg, steps_per_epoch=10)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = train.State(
        cfg,
        None,
        torch.device("cpu"),
        {},
        model,
        model,
        optimizer,
        scheduler,
        scaler,
        None,
        {"epoch": 0, "epoch_progress": train.new_progress(), "history": [], "best_epoch": 0, "best_val_acc": -1.0},
    )
    train.restore(state, saved)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    assert state.record["epoch"] == 2 and scheduler.last_epoch == saved["scheduler"]["last_epoch"]


def test_amp_may_change_on_resume(trained_run, tmp_path, run_main):
    """Mixed precision is how fast, not what is learned: a run saved with amp on continues with --no-amp."""
    run_dir = copy_run(trained_run, tmp_path / "amp")
    last = load_checkpoint(run_dir / "last.pt")[1]
    last["config"]["amp"] = True  # as if trained on a GPU with --amp
    save_checkpoint(last, run_dir / "last.pt")
    assert train.resume_config(last["config"], ["--resume", "--no-amp"]).amp is False
    result = run_main(*run_flags(run_dir), "--resume", "--no-amp", "--epochs", 3)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run_dir / "last.pt")[1]["config"]["amp"] is False


def test_a_checkpoint_from_before_the_schedule_was_renamed_resumes(trained_run, tmp_path, run_main):
    """A last.pt whose config names the schedule "onecycle" (its old name) resumes as "linear", the same schedule."""
    run_dir = copy_run(trained_run, tmp_path / "old")
    last = load_checkpoint(run_dir / "last.pt")[1]
    assert last["config"]["schedule"] == "linear"
    last["config"]["schedule"] = "onecycle"
    save_checkpoint(last, run_dir / "last.pt")
    result = run_main(*run_flags(run_dir), "--resume", "--epochs", 3)
    assert result.returncode == 0, result.stderr
    resumed = load_checkpoint(run_dir / "last.pt")[1]
    assert resumed["config"]["schedule"] == "linear" and resumed["history"][-1]["lr"] == 0.0


def test_a_checkpoint_from_before_gradient_clipping_resumes_without_it(trained_run, tmp_path, run_main):
    """A last.pt whose config has no clip_grad_norm (written before clipping existed) resumes as it trained: unclipped."""
    run_dir = copy_run(trained_run, tmp_path / "old")
    last = load_checkpoint(run_dir / "last.pt")[1]
    assert last["config"]["clip_grad_norm"] > 0
    del last["config"]["clip_grad_norm"]
    save_checkpoint(last, run_dir / "last.pt")
    result = run_main(*run_flags(run_dir), "--resume", "--epochs", 3)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run_dir / "last.pt")[1]["config"]["clip_grad_norm"] == 0.0


def test_a_torchrun_restart_adopts_its_own_folder_that_has_no_last_pt(
    trained_run, mnist_dir, tmp_path, run_main, monkeypatch
):
    """A worker lost between an epoch's best.pt and its first last.pt leaves a folder with best.pt alone; the restarted
    group starts again in that folder, its job's own, instead of refusing it as another run's."""
    run_dir = copy_run(trained_run, tmp_path / "runs", names=("best.pt",))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    rundir.mark_job(run_dir, distributed.job_id())  # marked by this launch: this test's process is its agent
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = run_main(*fast_args(mnist_dir, run_dir))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    assert [row["epoch"] for row in load_checkpoint(run_dir / "last.pt")[1]["history"]] == [1]
    assert load_checkpoint(run_dir / "best.pt")[1]["config"]["epochs"] == 1  # the new run's, not the lost one's


def test_a_new_launch_never_takes_over_an_earlier_launchs_run_of_the_same_job_id(
    trained_run, mnist_dir, tmp_path, run_main, monkeypatch
):
    """A finished run marked by an earlier torchrun launch with the same --rdzv-id is left as it is by a new launch
    whose first attempt died before it claimed a folder: the restart starts a run of its own."""
    earlier = copy_run(trained_run, tmp_path / "runs")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    this_launch = distributed.job_id()
    assert this_launch.startswith("job-7\n")
    # The earlier launch's agent: the same id and host, another process (a PID in use again cannot start twice).
    host, pid, started = this_launch.splitlines()[1].rsplit(":", 2)
    rundir.mark_job(earlier, f"job-7\n{host}:{pid}:{int(started) - 1}")
    before = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the first attempt died before claiming a folder
    result = run_main(*fast_args(mnist_dir, tmp_path / "runs" / "new", "--epochs", 2))  # the earlier run's flags
    assert result.returncode == 0, result.stderr
    assert "continuing" not in result.stdout
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([earlier.name, "new"])


def test_a_launch_is_known_by_any_of_its_agents(tmp_path):
    """A marker names the launch's rdzv id and its agents, one per machine; a restart whose agents include any of
    them (a machine replaced, the others the same) finds the run; the same id with other agents, or a marker from
    before agents were named, does not."""
    runs = tmp_path / "runs"
    for name, marker in (("ours", "job\na:1:10\nb:2:20"), ("old-style", "job"), ("other", "job\nc:3:30")):
        (runs / name).mkdir(parents=True)
        rundir.mark_job(runs / name, marker)
    assert rundir.job_run(runs, "job\nb:2:20\nd:4:40") == runs / "ours"
    assert rundir.job_run(runs, "job\nd:4:40") is None
    assert rundir.job_run(runs, "other-job\na:1:10") is None


def test_checkpoints_hold_no_rng_state_and_the_readme_lists_every_key(trained_run):
    """Nothing draws from the global RNG after start-up, so a checkpoint holds no RNG state; docs/checkpoints.md's
    table names each key of best.pt, and no other."""
    keys = set(torch.load(trained_run / "best.pt", weights_only=True))
    assert "rng" not in keys
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    table = text[text.index("| key | value |") :].split("\n\n")[0]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert listed == keys


def test_a_restart_of_a_job_without_an_id_never_adopts_another_jobs_folder(tmp_path, monkeypatch):
    """torchrun without --standalone names every job "none"; that is no id, so no restart finds a folder by it."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert distributed.job_id() == ""
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / rundir.JOB).write_text("none")  # another job's folder, marked with the shared default id
    rundir.mark_job(tmp_path / "runs" / "other", distributed.job_id())
    assert rundir.job_run(tmp_path / "runs", distributed.job_id()) is None
