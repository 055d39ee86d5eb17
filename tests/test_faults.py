"""Every fault and bad input: a clear one-line error, the right exit code, and nothing good lost on disk."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as model_module
import rundir
import train
from conftest import (
    N_TRAIN,
    PAUSED_TRAIN,
    ROOT,
    copy_run,
    fast_args,
    interrupt_when_paused,
    one_line_error,
    paused_at,
    run_flags,
    start,
)
from data import RAW_FILES
from model import load_checkpoint, save_checkpoint
from rundir import atomic_write

# --- checkpoints ----------------------------------------------------------------------


def test_missing_checkpoint(tmp_path):
    """Loading a path with no file says so and how to make one."""
    with pytest.raises(train.UserError, match=r"no checkpoint at .*nope.pt; train one with `python train.py`"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    """Empty, garbage or truncated files are reported as unreadable checkpoints, naming the file."""
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(train.UserError, match=rf"{path} is not a readable checkpoint"):
        load_checkpoint(path)


def test_torch_file_of_another_kind(tmp_path):
    """A torch file without this project's keys (say, a bare state_dict) is named as not our checkpoint."""
    path = tmp_path / "state_dict.pt"
    torch.save(model_module.CNN().state_dict(), path)
    with pytest.raises(train.UserError, match="not a checkpoint of this project"):
        load_checkpoint(path)


def test_checkpoint_whose_weights_do_not_fit_its_model(trained_run, tmp_path):
    """Weights that do not fit the named model (here: CNN weights labelled fcnn) give a one-line mismatch error."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt.update(model_name="fcnn", model_args={"hidden": 256})
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(train.UserError, match=r"the weights in .*mismatch.pt do not fit a fcnn model") as err:
        load_checkpoint(tmp_path / "mismatch.pt")
    assert "\n" not in str(err.value)


class RunsCode:
    """A pickle payload that would create a file when unpickled, if unpickling were allowed to run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    """A checkpoint carrying executable pickle content is refused by weights_only loading; its code never runs."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "model_name": "cnn", "model_args": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(train.UserError, match=r"refused to load .*could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A write that fails (here: disk full) leaves the previous checkpoint intact and cleans up its temporary file."""
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_name": "cnn", "model_args": {}}, path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "fsync", disk_full)
    with pytest.raises(
        train.UserError, match=r"could not save .*best.pt: No space left on device; the previous file is unchanged"
    ):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_name": "cnn", "model_args": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


SLOW_SAVE = """
import os, sys, threading
sys.path.insert(0, {root!r})
import torch
import model, rundir
def stalled_fsync(fd):  # the new bytes are written to the temporary file; hang before the rename
    print("writing", flush=True)
    threading.Event().wait()  # until the test kills this process
rundir.os.fsync = stalled_fsync
model.save_checkpoint({{"model": {{"w": torch.zeros(1000)}}, "model_name": "cnn", "model_args": {{}}}}, {path!r})
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """kill -9 in the middle of a save leaves the old checkpoint loadable and unchanged; the next save succeeds."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "model_name": "cnn", "model_args": {}}, path)
    before = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE.format(root=str(ROOT), path=str(path))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    assert (tmp_path / ".last.pt.tmp").stat().st_size > 0  # the new file was half-way there
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(1000))
    save_checkpoint({"model": {"w": torch.full((1000,), 2.0)}, "model_name": "cnn", "model_args": {}}, path)
    assert torch.load(path, weights_only=True)["model"]["w"][0] == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_write_replaces_the_whole_file(tmp_path):
    """atomic_write puts exactly the new bytes in place, also over a longer old file."""
    path = tmp_path / "metrics.json"
    atomic_write(path, b"x" * 100)
    atomic_write(path, b"short")
    assert path.read_bytes() == b"short"


# --- training runs ----------------------------------------------------------------------


def test_ctrl_c_saves_and_resume_finishes_like_an_unbroken_run(mnist_dir, tmp_path):
    """SIGINT mid-run exits 130 with the resume command; --resume then ends with the unbroken run's weights."""
    # Batches of 5 make each epoch 100 steps: the run pauses, still going, in the middle of epoch 2.
    args = fast_args(mnist_dir, tmp_path / "broken", "--epochs", 2, "--batch-size", 5)
    proc = start([sys.executable, PAUSED_TRAIN, *args], env=paused_at(150))
    result = interrupt_when_paused(proc, lambda: proc.send_signal(signal.SIGINT), timeout=60)
    assert result.returncode == 130, result.stderr
    assert f"To continue: python train.py --out-dir {tmp_path} --run-name broken --resume" in result.stderr
    assert "Traceback" not in result.stderr
    saved = load_checkpoint(tmp_path / "broken" / "last.pt")[1]
    assert (saved["epoch"], saved["epoch_progress"]["step"]) == (1, 50)
    assert train.main(["--out-dir", str(tmp_path), "--run-name", "broken", "--resume"]) == 0
    assert train.main(fast_args(mnist_dir, tmp_path / "whole", "--epochs", 2, "--batch-size", 5)) == 0
    a, b = (load_checkpoint(tmp_path / d / "last.pt")[0].state_dict() for d in ("broken", "whole"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def earlier_run(trained_run, out_dir) -> dict:
    """Copy a finished run into out_dir/earlier; return its files' bytes, to check later that nothing changed them."""
    earlier = out_dir / "earlier"
    earlier.mkdir(parents=True)
    for name in ("best.pt", "last.pt", "metrics.json"):
        (earlier / name).write_bytes((trained_run / name).read_bytes())
    return {p: p.read_bytes() for p in earlier.iterdir()}


def test_divergence_stops_with_advice_and_keeps_the_good_checkpoints(mnist_dir, trained_run, tmp_path, run_main):
    """A NaN loss stops training with exit 1 and a learning-rate hint; the earlier run's files are untouched."""
    before = earlier_run(trained_run, tmp_path)
    result = run_main(*fast_args(mnist_dir, tmp_path / "diverging", "--lr", 1e12, "--schedule", "constant"))
    message = one_line_error(result, exit_code=1)
    assert "training diverged in epoch 1 (loss is NaN or inf)" in message and "try a smaller --lr" in message
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "diverging").exists()  # it saved nothing, so it leaves no folder


def test_a_dead_network_stops_with_advice_and_never_reports_a_chance_level_test(
    mnist_dir, tmp_path, run_main, monkeypatch
):
    """A network dead from the start (every ReLU of conv2 off, so one digit for every image) stops after its first
    epoch past the warm-up with exit 1, one line naming the fix and its folder, and no "test:" line; its checkpoints
    stay as it left them, and --resume of the dead run says the same again."""

    def dead_cnn(name, **model_args):
        model = model_module.build_model(name, **model_args)
        with torch.no_grad():
            model.conv2.bias.fill_(-1e3)  # no input reaches the last layer, and no gradient gets back
        return model

    monkeypatch.setattr(train, "build_model", dead_cnn)
    run_dir = tmp_path / "dead"
    result = run_main(*fast_args(mnist_dir, run_dir, "--epochs", 3))
    message = one_line_error(result, exit_code=1)
    assert message.startswith("error: training is stuck at chance level: validation after epoch 1 the accuracy is ")
    assert "try a smaller --lr (such as 0.075) or a longer --warmup" in message
    assert message.endswith(f"Its checkpoints are as it left them, in {run_dir}/")
    assert "test:" not in result.stdout
    assert rundir.read_status(run_dir) == {"status": "died", "why": "training is stuck at chance level"}
    saved = load_checkpoint(run_dir / "last.pt")[1]
    assert saved["epoch"] == 1 and "test_acc" not in load_checkpoint(run_dir / "best.pt")[1]
    checkpoints = ("best.pt", "last.pt", "metrics.json")
    before = {name: (run_dir / name).read_bytes() for name in checkpoints}
    # Resumed with no epoch left, it goes straight to the test, which refuses the chance-level model in the same way.
    result = run_main(*run_flags(run_dir), "--resume", "--epochs", 1)
    assert "on the test set, with best.pt, the accuracy is " in one_line_error(result, exit_code=1)
    assert "test:" not in result.stdout
    assert {name: (run_dir / name).read_bytes() for name in checkpoints} == before


def test_a_learning_run_with_one_wrong_validation_image_is_not_stopped_as_dead(mnist_dir, tmp_path, run_main):
    """--val-size 1 whose one image is mislabelled: validation says 0% every epoch, but the run learns (its training
    accuracy is far above chance), so it is not stopped as dead; it trains every epoch and is tested."""
    data_dir = Path(shutil.copytree(mnist_dir, tmp_path / "data"))
    labels_path = data_dir / "MNIST" / "raw" / RAW_FILES["train"][1]
    labels = bytearray(labels_path.read_bytes())
    val_index = int(torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))[0])  # load_splits' draw
    labels[8 + val_index] = (labels[8 + val_index] + 5) % 10  # the label after the 8-byte header: now wrong
    labels_path.write_bytes(labels)
    result = run_main(*fast_args(data_dir, tmp_path / "runs" / "one", "--val-size", 1, "--epochs", 3))
    assert result.returncode == 0, result.stderr
    history = load_checkpoint(tmp_path / "runs" / "one" / "last.pt")[1]["history"]
    assert [row["val_acc"] for row in history] == [0.0, 0.0, 0.0]  # the one validation image is never right
    assert history[-1]["train_acc"] > 0.5 and "test: loss" in result.stdout
    assert rundir.read_status(tmp_path / "runs" / "one") == {"status": "finished"}


def test_disk_full_during_training_is_one_line_and_keeps_the_old_checkpoints(
    mnist_dir, trained_run, tmp_path, run_main, monkeypatch
):
    """When the disk fills up at the first save of a run, it stops with one line and the earlier files are intact."""
    before = earlier_run(trained_run, tmp_path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "fsync", disk_full)
    message = one_line_error(run_main(*fast_args(mnist_dir, tmp_path / "full")))
    assert "could not save" in message and "No space left on device; the previous file is unchanged" in message
    assert {p: p.read_bytes() for p in before} == before
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_resume_with_another_model_names_the_mismatch(trained_run, tmp_path, run_main):
    """--resume with a different --model is refused, naming the field and both values, and changes no file."""
    run = copy_run(trained_run, tmp_path)
    before = {p: p.read_bytes() for p in run.iterdir()}
    result = run_main(*run_flags(run), "--resume", "--model", "fcnn")
    message = one_line_error(result)
    assert "cannot resume: the saved run differs in model 'cnn' -> 'fcnn'" in message
    assert {p: p.read_bytes() for p in run.iterdir()} == before


def test_resume_with_a_changed_hyperparameter_names_it(trained_run, tmp_path, run_main):
    """--resume with a different learning rate or batch size is refused, naming each change."""
    run = copy_run(trained_run, tmp_path)
    message = one_line_error(run_main(*run_flags(run), "--resume", "--lr", 0.3, "--batch-size", 7))
    assert "batch_size 50 -> 7, lr 0.15 -> 0.3" in message


def test_resume_with_nothing_to_resume(tmp_path, run_main):
    """--resume with no saved run, or a run name that has no last.pt, says there is nothing to resume and how to start."""
    message = one_line_error(run_main("--out-dir", tmp_path, "--resume"))
    assert f"no run in {tmp_path}/ has a last.pt yet; train one with `python train.py`" in message
    message = one_line_error(run_main("--out-dir", tmp_path, "--run-name", "nope", "--resume"))
    assert f"nothing to resume: no {tmp_path / 'nope' / 'last.pt'}; check --run-name" in message


def test_out_dir_that_cannot_be_written_fails_before_training(mnist_dir, tmp_path, run_main):
    """An out dir that is a file, or inside one, is refused before any data is read or any epoch runs."""
    (tmp_path / "file").write_text("")
    result = run_main(*fast_args(mnist_dir, tmp_path / "file" / "run"))
    assert f"out dir {tmp_path / 'file'} is a file, not a folder" in one_line_error(result)
    result = run_main(*fast_args(mnist_dir, tmp_path / "file" / "runs" / "run"))
    assert f"cannot write to out dir {tmp_path / 'file' / 'runs'} (Not a directory)" in one_line_error(result)
    assert "epoch" not in result.stdout


@pytest.mark.parametrize(
    "problem, make_args, message",
    [
        ("missing data", lambda tmp: ["--data-dir", tmp / "empty", "--no-download"], "MNIST is not in"),
        ("data dir is a file", lambda tmp: ["--data-dir", tmp / "file"], "is a file, not a folder"),
        ("no cuda", lambda tmp: ["--device", "cuda"], "device cuda was asked for, but this torch has no cuda device"),
        (
            "amp on cpu",
            lambda tmp: ["--device", "cpu", "--amp"],
            "--amp needs a GPU or another accelerator, and this run is on the CPU; pass --no-amp",
        ),
    ],
)
def test_cli_reports_bad_setups_in_one_line(tmp_path, run_main, problem, make_args, message):
    """Bad data dirs and unavailable devices end the CLI with one 'error:' line and exit 2."""
    (tmp_path / "file").write_text("")
    if problem == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_main("--out-dir", tmp_path / "out", *make_args(tmp_path))
    assert message in one_line_error(result)


def test_a_genuine_bug_still_shows_a_traceback(mnist_dir, tmp_path):
    """Errors that are not user mistakes are not swallowed: a broken model class surfaces with its traceback."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train, model\n"
        "model.MODELS['cnn'] = lambda: 1 / 0\n"
        f"sys.exit(train.main({fast_args(mnist_dir, tmp_path)!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
