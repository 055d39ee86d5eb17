"""The checkpoint a user meant: every tool takes a .pt file, a run folder or a run name, and says first, on stderr,
which checkpoint it uses, so that training another model (now the latest run) never switches a tool silently."""

import json
import os

import pytest

import demo
import evaluate
import export
import predict
import rundir
import train
from conftest import call_main, copy_run, fast_args
from model import read_checkpoint
from test_predict import drawn_seven


def touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_find_checkpoint_takes_a_file_a_run_folder_a_run_name_or_the_latest(tmp_path, monkeypatch):
    """None: the latest run's best.pt; a run folder or a run name: its best.pt; a file: itself. A folder without
    best.pt and an unknown name are refused in one line that says what to pass."""
    runs = tmp_path / "runs"
    touch(runs / "a" / "best.pt", 2000)
    touch(runs / "b" / "best.pt", 1000)  # named last, saved first
    touch(runs / "c" / "last.pt", 3000)  # interrupted in its first epoch: no best.pt
    monkeypatch.chdir(tmp_path / "runs" / "c")  # run names are looked up in out_dir, not where the tool starts
    assert rundir.find_checkpoint(None, runs) == runs / "a" / "best.pt"
    assert rundir.find_checkpoint(runs / "b", runs) == runs / "b" / "best.pt"
    assert rundir.find_checkpoint("b", runs) == runs / "b" / "best.pt"
    assert rundir.find_checkpoint(runs / "b" / "best.pt", runs) == runs / "b" / "best.pt"
    assert rundir.find_checkpoint("last.pt", runs).resolve() == runs / "c" / "last.pt"  # a file here wins over a name
    with pytest.raises(rundir.UserError, match=r"^no best\.pt in .*/c \(it has a last\.pt: pass that file"):
        rundir.find_checkpoint(runs / "c", runs)
    with pytest.raises(rundir.UserError, match=rf"^no run named nope in {runs}/ and no file nope; pass a run name"):
        rundir.find_checkpoint("nope", runs)


def test_the_tools_pass_over_a_dead_run_and_say_so_when_it_is_named(trained_run, tmp_path):
    """A run that died (stuck at chance, or diverged) is never the latest run for the tools: they take the latest
    usable one (a finished run, or one stopped with Ctrl-C); named, a dead run's line says first that it died; with
    only dead runs, one line says so and how to use one anyway."""
    runs = tmp_path / "runs"
    for name, status, mtime in (("good", "finished", 1000), ("paused", "stopped", 2000), ("dead", "died", 3000)):
        run = copy_run(trained_run, runs)
        run = run.rename(runs / name)
        rundir.write_status(run, status, "training is stuck at chance level" if status == "died" else "")
        os.utime(run / "best.pt", (mtime, mtime))
    assert rundir.find_checkpoint(None, runs) == runs / "paused" / "best.pt"  # a Ctrl-C'd run is not dead
    assert rundir.latest_checkpoint(runs) == runs / "paused" / "best.pt"
    dead = rundir.find_checkpoint("dead", runs)
    line = rundir.describe_checkpoint(dead, read_checkpoint(dead))
    assert line.startswith(f"using {dead}: run dead, which died (training is stuck at chance level), model cnn, ")
    for name in ("good", "paused"):
        rundir.write_status(runs / name, "died", "training diverged in epoch 1 (loss is NaN or inf)")
    with pytest.raises(rundir.UserError) as error:
        rundir.find_checkpoint(None, runs)
    assert str(error.value) == (
        f"every run in {runs}/ with a best.pt died, the latest {runs / 'dead'} (training is stuck at chance level); "
        f"train a new one with `python train.py`, or pass a run's name to use it anyway"
    )


def test_the_describing_line_says_run_model_and_test_accuracy(trained_run):
    """The line names the file, its run folder, the model and the stored test accuracy; a checkpoint that was never
    tested (a last.pt) says so, with its epoch and validation accuracy."""
    best, last = read_checkpoint(trained_run / "best.pt"), read_checkpoint(trained_run / "last.pt")
    assert rundir.describe_checkpoint(trained_run / "best.pt", best) == (
        f"using {trained_run / 'best.pt'}: run {trained_run.name}, model cnn, test accuracy {best['test_acc']:.2%}"
    )
    assert rundir.describe_checkpoint(trained_run / "last.pt", last).endswith(
        f"model cnn, not tested (epoch {last['epoch']}, val accuracy {last['history'][-1]['val_acc']:.2%})"
    )


@pytest.fixture(scope="module")
def two_runs(trained_run, mnist_dir, tmp_path_factory):
    """A folder whose runs/ holds a CNN run and, saved after it, an FCNN run: the FCNN is now the latest."""
    cwd = tmp_path_factory.mktemp("two-runs")
    cnn = copy_run(trained_run, cwd / "runs")
    assert train.main(fast_args(mnist_dir, cwd / "runs" / "fcnn", "--model", "fcnn", "--fcnn-hidden", 32)) == 0
    return cwd, cnn.name


def expected_line(cwd, run_name):
    path = os.path.join("runs", run_name, "best.pt")
    ckpt = read_checkpoint(cwd / path)
    return f"using {path}: run {run_name}, model {ckpt['model_name']}, test accuracy {ckpt['test_acc']:.2%}"


@pytest.fixture
def in_two_runs(two_runs, monkeypatch):
    cwd, cnn = two_runs
    monkeypatch.chdir(cwd)
    return cwd, cnn


def test_predict_says_first_which_checkpoint_and_keeps_json_pure(in_two_runs, tmp_path, capsys):
    """predict.py names the latest run (the FCNN) by default and the run asked for by name or folder, on stderr's
    first line; with --json, stdout is exactly one JSON document."""
    cwd, cnn = in_two_runs
    image = tmp_path / "seven.png"
    drawn_seven().save(image)
    for given, run in ([], "fcnn"), (["--checkpoint", cnn], cnn), (["--checkpoint", f"runs/{cnn}"], cnn):
        result = call_main(capsys, predict.main, [image, "--json", *given])
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [expected_line(cwd, run)]
        assert [answer["path"] for answer in json.loads(result.stdout)] == [str(image)]


def test_evaluate_says_which_checkpoint_before_its_report(in_two_runs, tmp_path, capsys):
    """evaluate.py takes a run name too, and names the checkpoint on stderr, its report staying on stdout."""
    cwd, cnn = in_two_runs
    result = call_main(capsys, evaluate.main, [cnn, "--out-dir", tmp_path])
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [expected_line(cwd, cnn)]
    assert result.stdout.startswith(f"{cnn} ({os.path.join('runs', cnn, 'best.pt')}): cnn, ")


def test_export_says_which_checkpoint(in_two_runs, tmp_path, capsys):
    """export.py given a run folder exports its best.pt and names it on stderr before it writes anything."""
    cwd, cnn = in_two_runs
    result = call_main(capsys, export.main, [f"runs/{cnn}", "--format", "pt2", "--out", tmp_path / "model.pt2"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [expected_line(cwd, cnn)]
    assert (tmp_path / "model.pt2").is_file()


def test_demo_says_which_checkpoint_before_it_serves(in_two_runs, capsys, monkeypatch):
    """demo.py names the checkpoint it serves on stderr, before the line with the page's address."""
    cwd, _ = in_two_runs
    monkeypatch.setattr(demo.uvicorn.Server, "run", lambda self, sockets: sockets[0].close())  # serve nothing
    result = call_main(capsys, demo.main, ["--port", 0])
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [expected_line(cwd, "fcnn")]
    assert result.stdout.startswith("serving the demo on http://127.0.0.1:")
