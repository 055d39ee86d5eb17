"""TensorBoard: every run logs its curves, hyperparameters and figures into its own folder, read back
with TensorBoard's own reader and served by the real `tensorboard` server."""

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import PAUSED, PAUSED_TRAIN, fast_args, kill_all, paused_at, start, wait_for_line

STEPS_PER_EPOCH = 10  # fast_args: 500 training images in batches of 50
SCALARS = {
    "step/loss",
    "step/lr",
    "loss/train",
    "loss/val",
    "accuracy/train",
    "accuracy/val",
    "speed/epoch_seconds",
    "speed/images_per_second",
    "test/loss",
    "test/accuracy",
}


def events(run_dir: Path) -> EventAccumulator:
    """Every event file in a run folder, read as TensorBoard reads them (purged steps left out)."""
    reader = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    reader.Reload()
    return reader


def steps(reader: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in reader.Scalars(tag)]


@pytest.fixture(scope="module")
def logged_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished two-epoch run that logs its step curves every 3 steps."""
    run_dir = tmp_path_factory.mktemp("logged")
    assert train.main(fast_args(mnist_dir, run_dir, "--epochs", 2, "--log-every", 3)) == 0
    return run_dir


def test_a_run_logs_every_curve_at_the_right_steps(logged_run):
    """Step curves every log_every optimiser steps, epoch curves at each epoch's last step, the test result at the end."""
    reader = events(logged_run)
    assert set(reader.Tags()["scalars"]) >= SCALARS
    assert steps(reader, "step/loss") == steps(reader, "step/lr") == [3, 6, 9, 12, 15, 18]
    for tag in SCALARS - {"step/loss", "step/lr", "test/loss", "test/accuracy"}:
        assert steps(reader, tag) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], tag
    metrics = json.loads((logged_run / "metrics.json").read_text())
    assert [e.value for e in reader.Scalars("accuracy/val")] == pytest.approx(
        [r["val_acc"] for r in metrics["history"]]
    )
    assert reader.Scalars("test/accuracy")[0].value == pytest.approx(metrics["test_acc"])


def test_a_run_logs_its_hyperparameters_and_test_figures(logged_run):
    """The HParams tab gets the config and the final metrics; the confusion matrix and mistakes are images."""
    reader = events(logged_run)
    assert {"test/confusion_matrix", "test/confident_mistakes"} <= set(reader.Tags()["images"])
    assert all(
        len(reader.Images(tag)[0].encoded_image_string) > 10_000
        for tag in ("test/confusion_matrix", "test/confident_mistakes")
    )
    session = reader.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"batch_size" in session and b"lr" in session and b"data_dir" not in session
    assert "hparam/test_accuracy" in reader.Tags()["scalars"]


def test_resume_continues_the_curves_without_a_step_twice(mnist_dir, tmp_path):
    """A run resumed from an older last.pt purges what was logged after it, so every step appears once."""
    run_dir = tmp_path / "run"
    assert train.main(fast_args(mnist_dir, run_dir, "--epochs", 1, "--log-every", 3)) == 0
    epoch_one = (run_dir / "last.pt").read_bytes()
    assert train.main(fast_args(mnist_dir, run_dir, "--epochs", 2, "--resume")) == 0
    (run_dir / "last.pt").write_bytes(epoch_one)  # as if epoch 2 had been logged, then the run was killed
    for path in run_dir.glob("events.out.tfevents.*"):  # ... a while ago: TensorBoard reads the files in name order,
        _, _, _, seconds, rest = path.name.split(".", 4)  # and a name starts with the second its writer was made
        path.rename(path.with_name(f"events.out.tfevents.{int(seconds) - 60:010d}.{rest}"))
    assert train.main(fast_args(mnist_dir, run_dir, "--epochs", 2, "--resume")) == 0
    reader = events(run_dir)
    assert steps(reader, "step/loss") == [3, 6, 9, 12, 15, 18]
    assert steps(reader, "loss/val") == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 3


def test_no_tensorboard_writes_no_events(mnist_dir, tmp_path):
    """--no-tensorboard trains the same way and leaves no event file."""
    assert train.main(fast_args(mnist_dir, tmp_path / "quiet", "--no-tensorboard")) == 0
    assert (tmp_path / "quiet" / "best.pt").is_file()
    assert not list((tmp_path / "quiet").glob("events.out.tfevents.*"))


def test_a_killed_run_leaves_readable_events(mnist_dir, tmp_path):
    """kill -9 in the second epoch leaves event files that TensorBoard reads, holding the first epoch."""
    args = fast_args(mnist_dir, tmp_path / "killed", "--epochs", 2, "--batch-size", 5)
    proc = start([sys.executable, PAUSED_TRAIN, *args], env=paused_at(150))  # half-way through epoch 2
    try:
        wait_for_line(proc, PAUSED)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL  # it was still running, with its writer open
    finally:
        if proc.returncode is None:
            kill_all(proc)
    reader = events(tmp_path / "killed")
    assert steps(reader, "loss/val")[:1] == [100]  # 500 images in batches of 5


def test_tensorboard_server_lists_the_runs_scalars(logged_run, tmp_path):
    """The real `tensorboard --logdir` on a loopback port serves the run and its scalar tags through its HTTP API."""
    if shutil.which("tensorboard", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the tensorboard command is not installed beside this Python")
    logdir = tmp_path / "runs"
    shutil.copytree(logged_run, logdir / "mine")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "tensorboard"),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast",
            "false",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, printed, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            printed.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found and found[1]
        assert url, "tensorboard did not say where it serves; it printed:\n" + "".join(printed[-20:])
        threading.Thread(target=server.stdout.read, daemon=True).start()  # a full pipe would stop the server
        tags = {}
        while "mine" not in tags and time.monotonic() < deadline:  # it loads the events in the background
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10) as response:
                tags = json.load(response)
            time.sleep(0.5)
        assert set(tags["mine"]) >= SCALARS
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
