"""Run folders: a new run never touches another run's files, two processes never share a folder,
and the latest run is one call away."""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import evaluate
import rundir
import train
from conftest import (
    PAUSED_TRAIN,
    ROOT,
    call_main,
    copy_run,
    fast_args,
    interrupt_when_paused,
    one_line_error,
    paused_at,
    run_flags,
    start,
)
from model import load_checkpoint

FAST = ["--no-download", "--val-size", "100", "--epochs", "1", "--batch-size", "50", "--device", "cpu"]


def files_of(run_dir) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}


def run_folders(out_dir) -> list:
    return sorted(p for p in out_dir.iterdir() if p.is_dir())


def test_running_twice_keeps_both_runs(mnist_dir, tmp_path, run_main):
    """`python train.py` twice with the same flags makes two run folders; the first run's files are byte-identical after the second."""
    args = ["--data-dir", mnist_dir, "--out-dir", tmp_path, *FAST]
    assert run_main(*args).returncode == 0
    [first] = run_folders(tmp_path)
    before = files_of(first)
    assert {"best.pt", "last.pt", "metrics.json", "curves.png"} <= before.keys()
    assert run_main(*args, "--seed", 1).returncode == 0
    folders = run_folders(tmp_path)
    assert len(folders) == 2 and first in folders
    assert files_of(first) == before
    assert all(re.fullmatch(r"\d{8}-\d{6}-cnn(-\d+)?", folder.name) for folder in folders)  # start time, model


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Two fresh run folders asked for at once never coincide, and a folder name is never handed out twice."""
    names = {rundir.new_run_dir(tmp_path, "", "cnn").name for _ in range(5)}
    assert len(names) == 5


def test_a_named_run_is_never_started_over(trained_run, mnist_dir, tmp_path, run_main):
    """A fresh run into an existing run's folder (--run-name) is refused in one line, and its files are unchanged."""
    run = copy_run(trained_run, tmp_path)
    before = files_of(run)
    message = one_line_error(run_main(*fast_args(mnist_dir, run)))
    assert f"run {run} already exists; continue it with --run-name {run.name} --resume" in message
    assert files_of(run) == before


def test_latest_checkpoint_is_the_run_saved_last(tmp_path):
    """latest_checkpoint() gives the best.pt saved last (not the one named last); latest_run() can ask for last.pt."""
    for name, age in (("zzz-old", 100), ("aaa-new", 0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").write_bytes(b"")
        os.utime(tmp_path / name / "best.pt", (time.time() - age, time.time() - age))
    (tmp_path / "interrupted").mkdir()
    (tmp_path / "interrupted" / "last.pt").write_bytes(b"")
    assert rundir.latest_checkpoint(tmp_path) == tmp_path / "aaa-new" / "best.pt"
    assert rundir.latest_run(tmp_path, "last.pt") == tmp_path / "interrupted"
    with pytest.raises(rundir.UserError, match=r"no run in .* has a best\.pt yet; train one with `python train\.py`"):
        rundir.latest_checkpoint(tmp_path / "interrupted")


def test_resume_continues_the_latest_run_or_the_named_one(mnist_dir, tmp_path, run_main):
    """--resume alone continues the run that saved last; --run-name picks another; neither starts a new folder."""
    args = ["--data-dir", mnist_dir, "--out-dir", tmp_path, *FAST]
    assert run_main(*args, "--run-name", "first").returncode == 0
    assert run_main(*args, "--run-name", "second").returncode == 0
    assert run_main("--out-dir", tmp_path, "--resume", "--epochs", 2).returncode == 0
    assert run_main("--out-dir", tmp_path, "--run-name", "first", "--resume", "--epochs", 3).returncode == 0
    assert [p.name for p in run_folders(tmp_path)] == ["first", "second"]
    assert load_checkpoint(tmp_path / "second" / "last.pt")[1]["epoch"] == 2
    assert load_checkpoint(tmp_path / "first" / "last.pt")[1]["epoch"] == 3


def test_evaluate_with_no_arguments_takes_the_latest_best(trained_run, mnist_dir, tmp_path, capsys, monkeypatch):
    """`python evaluate.py` with no checkpoint evaluates the latest run's best.pt under runs/."""
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    result = call_main(capsys, evaluate.main, ["--data-dir", mnist_dir, "--out-dir", tmp_path / "figures"])
    assert result.returncode == 0, result.stderr
    assert f"mine ({os.path.join('runs', 'mine', 'best.pt')}): cnn" in result.stdout


HOLD_LOCK = """
import sys, threading
sys.path.insert(0, {root!r})
import rundir
with rundir.locked(rundir.Path({run_dir!r})):
    print("locked", flush=True)
    threading.Event().wait()  # until the test kills this process
"""


def hold_lock(run_dir) -> subprocess.Popen:
    """A process that holds run_dir's lock until it is killed, as a training run does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), run_dir=str(run_dir))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_folder_in_use_is_refused_with_its_owner(mnist_dir, tmp_path, run_main):
    """While another process holds a run folder, a second run into it fails in one line naming the owner's PID."""
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    proc = hold_lock(run_dir)
    try:
        message = one_line_error(run_main(*fast_args(mnist_dir, run_dir)))
        assert f"run {run_dir} is being written by train.py with PID {proc.pid} on" in message
        assert (run_dir / rundir.LOCK).exists()  # the loser never removes the owner's lock
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_lock_left_by_kill_9_does_not_block_the_next_run(mnist_dir, tmp_path, run_main):
    """After the lock's owner dies by SIGKILL, its lock file is still there but a new run into the folder works."""
    run_dir = tmp_path / "orphan"
    run_dir.mkdir()
    proc = hold_lock(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert (run_dir / rundir.LOCK).exists()
    assert run_main(*fast_args(mnist_dir, run_dir)).returncode == 0
    assert (run_dir / "best.pt").is_file()


def test_two_runs_started_at_once_write_to_two_folders(mnist_dir, tmp_path):
    """Two `python train.py` processes started together both finish, each in a folder of its own."""
    args = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(mnist_dir), "--out-dir", str(tmp_path), *FAST]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    folders = run_folders(tmp_path)
    assert len(folders) == 2 and all((folder / "best.pt").is_file() for folder in folders)


def test_interrupted_run_prints_the_command_that_resumes_it(mnist_dir, tmp_path, run_main, capsys):
    """A run stopped mid-epoch names its own folder in the resume command it prints, and that command continues it."""
    cfg = train.config.parse_args(["--data-dir", str(mnist_dir), "--out-dir", str(tmp_path), *FAST])
    assert train.run(cfg, stop_requested=lambda: True) == 130
    [folder] = run_folders(tmp_path)
    assert rundir.read_status(folder) == {"status": "stopped"}
    command = capsys.readouterr().err.split("To continue: ")[1].split()
    assert command == ["python", "train.py", *run_flags(folder), "--resume"]
    assert run_main(*command[2:]).returncode == 0
    assert [row["epoch"] for row in load_checkpoint(folder / "last.pt")[1]["history"]] == [1]
    assert rundir.read_status(folder) == {"status": "finished"}


def test_the_run_folder_printed_is_there_or_said_removed(mnist_dir, tmp_path, run_main):
    """ "run folder: X" is printed once the run holds X; a run that then fails before any save removes X and says so,
    and a run refused before it holds a folder names none."""
    runs = tmp_path / "runs"
    failed = run_main(*fast_args(tmp_path / "no-data", runs / "a"))  # no MNIST there, and --no-download
    assert "MNIST is not in" in one_line_error(failed)
    assert f"run folder: {runs / 'a'}\n" in failed.stdout
    assert f"run folder {runs / 'a'} removed: the run saved nothing\n" in failed.stdout and not (runs / "a").exists()
    done = run_main(*fast_args(mnist_dir, runs / "b"))
    assert done.returncode == 0 and f"run folder: {runs / 'b'}\n" in done.stdout and "removed" not in done.stdout
    refused = run_main(*fast_args(mnist_dir, runs / "b"))  # b holds a run: refused before it is claimed
    assert "already exists" in one_line_error(refused) and "run folder" not in refused.stdout


@pytest.mark.parametrize("name", ["-x", "--lr"])
def test_the_resume_command_of_a_run_named_like_a_flag_parses(mnist_dir, tmp_path, run_main, capsys, name):
    """A run whose name begins with - prints a resume command (--run-name=-x) that the shell and train.py parse back
    to that run, and that continues it."""
    cfg = train.config.parse_args(
        ["--data-dir", str(mnist_dir), "--out-dir", str(tmp_path), f"--run-name={name}", *FAST]
    )
    assert train.run(cfg, stop_requested=lambda: True) == 130
    command = shlex.split(capsys.readouterr().err.split("To continue: ")[1])
    assert command[:2] == ["python", "train.py"] and train.config.parse_args(command[2:]).run_name == name
    assert run_main(*command[2:]).returncode == 0
    assert [row["epoch"] for row in load_checkpoint(tmp_path / name / "last.pt")[1]["history"]] == [1]
    again = one_line_error(run_main("--data-dir", mnist_dir, "--out-dir", tmp_path, f"--run-name={name}", *FAST))
    assert f"continue it with --run-name={name} --resume" in again  # the message's own command parses too


def test_a_run_name_that_names_a_file_says_so(mnist_dir, tmp_path, run_main):
    """--run-name naming a file in the out dir is refused in one line that says so, not blamed on the out dir; the
    file is untouched."""
    (tmp_path / "notes").write_text("mine")
    message = one_line_error(run_main(*fast_args(mnist_dir, tmp_path / "notes")))
    assert message.startswith(f"error: run name notes names a file, {tmp_path / 'notes'}, not a run folder")
    assert "out dir" not in message and (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("existed", [False, True])
def test_a_first_run_that_saved_nothing_leaves_no_out_dir_it_made(tmp_path, run_main, existed):
    """A run that fails before its first save removes the out dir too when it made it, and only then: an (empty) out
    dir that was there before stays."""
    runs = tmp_path / "deep" / "runs"
    if existed:
        runs.mkdir(parents=True)
    failed = run_main(*fast_args(tmp_path / "no-data", runs / "a"))  # no MNIST there, and --no-download
    assert "MNIST is not in" in one_line_error(failed)
    assert runs.is_dir() == existed and (tmp_path / "deep").is_dir() == existed


def test_a_run_that_saved_nothing_removes_only_its_own_files(mnist_dir, tmp_path, run_main):
    """A failed run into a named folder removes the event files it wrote and its lock, never an earlier run's event
    files (one killed with kill -9 before its first save) nor a user's file, and so keeps the folder."""
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    earlier = run_dir / "events.out.tfevents.1700000000.otherhost.4242.0"
    earlier.write_bytes(b"an earlier run's curves")
    (run_dir / "notes.txt").write_text("mine")
    assert "MNIST is not in" in one_line_error(run_main(*fast_args(tmp_path / "no-data", run_dir)))
    assert sorted(p.name for p in run_dir.iterdir()) == [earlier.name, "notes.txt"]


def test_a_run_killed_before_its_first_save_leaves_what_the_docs_say(mnist_dir, tmp_path):
    """kill -9 before the first save (it runs no code) leaves the folder that docs/runs.md describes: its lock, owner,
    status "running" and its event file, with no process holding the lock; the tools pass it by (it has no best.pt)."""
    out = tmp_path / "runs"
    proc = start([sys.executable, PAUSED_TRAIN, "--data-dir", mnist_dir, "--out-dir", out, *FAST], env=paused_at(3))
    interrupt_when_paused(proc, lambda: proc.send_signal(signal.SIGKILL))
    [killed] = run_folders(out)
    names = {p.name for p in killed.iterdir()}
    events = {name for name in names if name.startswith("events.out.tfevents.")}
    assert names - events == {rundir.LOCK, rundir.OWNER, rundir.STATUS} and len(events) == 1
    assert rundir.read_status(killed) == {"status": "running"} and rundir.writer_of(killed) is None
    with pytest.raises(rundir.UserError, match=r"has a best\.pt yet"):
        rundir.find_checkpoint(None, out)


NO_SPACE = "could not save runs/x/last.pt: No space left on device"


@pytest.mark.parametrize(
    "ending, expected",
    [
        ("finished", {"status": "finished"}),
        ("returned", {"status": "stopped"}),  # train.py returns without "finished" only when a signal stopped it
        (KeyboardInterrupt(), {"status": "stopped"}),
        (
            train.Diverged("training diverged in epoch 2 (loss is NaN or inf), most likely the learning rate ..."),
            {"status": "died", "why": "training diverged in epoch 2 (loss is NaN or inf)"},
        ),
        (rundir.UserError(NO_SPACE), {"status": "failed", "why": NO_SPACE}),
    ],
)
def test_a_run_status_says_how_it_ended(tmp_path, ending, expected):
    """status.json says running while the block runs, then finished, stopped (Ctrl-C, or an end without finished),
    died (the exception train.py names) with the error's first clause, or failed with the error."""
    with contextlib.suppress(type(ending)), rundir.status_kept(tmp_path, died=train.Diverged):
        during = rundir.read_status(tmp_path)
        if ending == "finished":
            rundir.write_status(tmp_path, "finished")
        elif isinstance(ending, BaseException):
            raise ending
    assert during == {"status": "running"} and rundir.read_status(tmp_path) == expected
