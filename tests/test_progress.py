"""What train.py tells a user whose run is slow or whose output goes to a log: the busy-CPU note and plain progress."""

import re

import pytest
import torch

import devices
import progress
from conftest import fast_args

BUSY = {1: 1.0, 2: 3.3}  # seconds of the same convolution at 1 and 2 threads, as measured beside two busy loops
IDLE = {1: 1.0, 2: 0.57}


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend torch runs with 2 threads that take the given seconds, with no OMP_NUM_THREADS set."""

    def pretend(seconds: dict):
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        monkeypatch.setattr(devices, "convolution_seconds", lambda threads: seconds[threads])

    return pretend


def test_busy_cores_get_a_one_line_note_with_the_fix(cpu_with):
    """When torch's threads are slower than one thread on the same work, the note says so and how to fix it."""
    cpu_with(BUSY)
    note = devices.busy_cpu_note(torch.device("cpu"))
    assert note.startswith("note: ") and "\n" not in note
    assert "2 threads took 3.3x as long as 1" in note and "OMP_NUM_THREADS=1 python train.py" in note


@pytest.mark.parametrize(
    "seconds, device, env, threads",
    [
        (IDLE, "cpu", None, 2),  # idle cores: threads pay off
        (BUSY, "cpu", "2", 2),  # the user chose the thread count
        (BUSY, "cpu", "1", 2),
        (BUSY, "cpu", None, 1),  # one thread already
        (BUSY, "cuda", None, 2),  # the CPU's threads do not train an accelerator's run
    ],
)
def test_no_note_when_idle_or_the_threads_were_chosen(monkeypatch, cpu_with, seconds, device, env, threads):
    """No note on idle cores, with OMP_NUM_THREADS set (even to 1), at one thread, or on an accelerator."""
    cpu_with(seconds)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    if env:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert devices.busy_cpu_note(torch.device(device)) is None


def test_the_measurement_times_the_thread_count_asked_and_restores_it():
    """convolution_seconds runs at the thread count it is given and leaves torch's own as it was."""
    seen = []
    real_conv = torch.nn.functional.conv2d
    before = torch.get_num_threads()

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real_conv(*args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(devices.F, "conv2d", spy)
        assert devices.convolution_seconds(2, repeats=3) > 0
    assert seen == [2] * 4 and torch.get_num_threads() == before


def test_train_prints_the_note_under_the_device_line(mnist_dir, tmp_path, run_main, cpu_with):
    """A run on busy cores prints the note once, right after the device line; on idle ones it prints none."""
    cpu_with(BUSY)
    out = run_main(*fast_args(mnist_dir, tmp_path / "busy")).stdout.splitlines()
    device = next(i for i, line in enumerate(out) if line.startswith("device: "))
    assert out[device + 1].startswith("note: this CPU's cores are busy")
    cpu_with(IDLE)
    assert "note: " not in run_main(*fast_args(mnist_dir, tmp_path / "idle")).stdout


def test_a_log_gets_plain_progress_lines_that_epoch_rows_cannot_be_taken_for(
    mnist_dir, tmp_path, run_main, monkeypatch
):
    """Not in a terminal, each step past PLAIN_EVERY seconds prints one plain line with the step and the figures:
    no carriage return, and a word first, so a reader of epoch rows (which start with a number) skips it."""
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    out = run_main(*fast_args(mnist_dir, tmp_path)).stdout
    plain = [line for line in out.splitlines() if line.startswith("epoch 1/1: step ")]
    assert len(plain) == 10  # fast_args: 500 training images in batches of 50
    assert all(re.fullmatch(r"epoch 1/1: step \d+/10(, loss [\d.]+, acc [\d.]+%, lr [\d.]+)?, \d+ s", p) for p in plain)
    assert "loss " in plain[-1] and "\r" not in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 1 and rows[0].split()[0] == "1"


def test_a_terminal_gets_the_bar_and_no_plain_lines(monkeypatch, capsys):
    """With stdout and stderr both terminals, progress is tqdm's bar alone; with either redirected, the plain lines."""
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    for out_tty, err_tty, plain in [(True, True, False), (False, True, True), (True, False, True)]:
        monkeypatch.setattr("sys.stdout.isatty", lambda tty=out_tty: tty)
        monkeypatch.setattr("sys.stderr.isatty", lambda tty=err_tty: tty)
        bar = progress.Progress(3, 0, "epoch 1/1", enabled=True)
        bar.update()
        bar.close()
        assert ("epoch 1/1: step 1/3" in capsys.readouterr().out) == plain
    assert not progress.Progress(3, 0, "epoch 1/1", enabled=False).plain  # torchrun's other ranks print nothing
