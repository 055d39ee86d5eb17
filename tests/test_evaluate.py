import shutil

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import evaluate
import metrics
from conftest import ROOT, call_main, fast_args, one_line_error
from data import MNISTData, load_split
from model import load_checkpoint


@pytest.fixture
def run_evaluate(capsys):
    """evaluate.py's main, run in this process."""
    return lambda *args: call_main(capsys, evaluate.main, args)


@pytest.fixture(scope="module")
def fcnn_run(mnist_dir, tmp_path_factory):
    """A finished one-epoch FCNN run on the synthetic data, to compare against the CNN."""
    import train

    out = tmp_path_factory.mktemp("fcnn")
    assert train.main(fast_args(mnist_dir, out, "--model", "fcnn", "--fcnn-hidden", 32)) == 0
    return out


def test_evaluate_writes_every_figure_and_the_comparison(trained_run, fcnn_run, mnist_dir, tmp_path, run_evaluate):
    """Two checkpoints give reports, one comparison table, overlaid curves, and per-run figures (filters for the CNN)."""
    result = run_evaluate(trained_run / "best.pt", fcnn_run / "best.pt", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    cnn, fcnn = trained_run.name, fcnn_run.name
    assert {p.name for p in tmp_path.iterdir()} == {
        "curves.png",
        f"confusion_{cnn}.png",
        f"mistakes_{cnn}.png",
        f"filters_{cnn}.png",
        f"confusion_{fcnn}.png",
        f"mistakes_{fcnn}.png",
    }
    # A drawn figure: the smallest, the strip of filters, is 9 KB with matplotlib 3.7 (13 KB with 3.11).
    assert all(p.stat().st_size > 5_000 for p in tmp_path.iterdir())
    table = result.stdout[result.stdout.index("run ") :]
    assert f"{cnn}" in table and "8,490" in table and f"{784 * 32 + 32 + 330:,}" in table


def test_comparison_stays_aligned_whatever_the_run_names():
    """Each row of the side-by-side table is as long as its header, with every value under its heading, when run
    names are longer than the heading (a timestamped or user-chosen name) or shorter."""
    one = {
        "name": "cnn",
        "parameters": 8490,
        "best_epoch": 8,
        "epochs_to_98": 3,
        "val_acc": 0.992,
        "test_acc": 0.9939,
        "seconds_per_epoch": 3.4,
    }
    other = {**one, "name": "fcnn", "parameters": 203530, "best_epoch": None, "epochs_to_98": None, "test_acc": 0.984}
    results = {"a": one, "20261202-113000-cnn-lr0.05-weight-decay-5e-4": other, "run": one}
    header, *rows = evaluate.format_comparison(results).splitlines()
    assert {len(line) for line in rows} == {len(header)}
    for row, (label, r) in zip(rows, results.items()):
        assert row.startswith(f"{label} ")
        assert row[header.index("model") :].startswith(f"{r['name']} ")
        assert row[: header.index("test acc") + len("test acc")].endswith(f" {r['test_acc']:.2%}")
        assert row.endswith(f" {r['seconds_per_epoch']:.1f}")


def test_figures_go_into_the_evaluated_runs_own_folder(trained_run, mnist_dir, tmp_path, run_evaluate):
    """Without --out-dir the figures go to eval/ inside the first checkpoint's run folder, and nowhere else."""
    run = tmp_path / "runs" / "cnn"
    run.mkdir(parents=True)
    shutil.copy(trained_run / "best.pt", run / "best.pt")
    assert run_evaluate(run / "best.pt", "--data-dir", mnist_dir).returncode == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "runs/cnn/best.pt",
        "runs/cnn/eval/confusion_cnn.png",
        "runs/cnn/eval/curves.png",
        "runs/cnn/eval/filters_cnn.png",
        "runs/cnn/eval/mistakes_cnn.png",
    ]


def test_evaluate_help(capsys):
    """evaluate.py --help describes the checkpoints argument and exits 0."""
    with pytest.raises(SystemExit) as done:
        evaluate.parse_args(["--help"])
    assert done.value.code == 0 and "checkpoints" in capsys.readouterr().out


def test_train_saves_its_curves(trained_run):
    """train.py leaves a curves figure beside its checkpoints."""
    assert (trained_run / "curves.png").stat().st_size > 10_000


def test_evaluate_reports_the_accuracy_training_stored(trained_run, mnist_dir, tmp_path, run_evaluate):
    """The test accuracy evaluate.py prints is the one train.py saved in best.pt, for the same data."""
    stored = load_checkpoint(trained_run / "best.pt")[1]["test_acc"]
    result = run_evaluate(trained_run / "best.pt", "--data-dir", mnist_dir, "--out-dir", tmp_path)
    assert f"accuracy {stored:.2%}" in result.stdout
    model, ckpt = load_checkpoint(trained_run / "best.pt")
    test = MNISTData(*load_split(mnist_dir, train=False, download=False))
    assert evaluate.evaluate_checkpoint(trained_run / "best.pt", model, ckpt, test, 64)["test_acc"] == stored


def test_confusion_matrix_agrees_with_accuracy_and_per_class_numbers(trained_run, mnist_dir):
    """The matrix sums to the test size, its diagonal to the correct count, and precision/recall come from its columns/rows."""
    model, ckpt = load_checkpoint(trained_run / "best.pt")
    test = MNISTData(*load_split(mnist_dir, train=False, download=False))
    result = evaluate.evaluate_checkpoint(trained_run / "best.pt", model, ckpt, test, 64)
    matrix = result["matrix"]
    assert matrix.sum() == len(test)
    assert matrix.diag().sum().item() / len(test) == result["test_acc"]
    assert torch.equal(matrix.sum(dim=1), test.labels.bincount(minlength=10))
    precision, recall = metrics.per_class(matrix)
    for d in range(10):
        predicted_d, true_d = result["predicted"] == d, test.labels == d
        assert recall[d].item() == pytest.approx((predicted_d & true_d).sum().item() / true_d.sum().item())
        if predicted_d.any():
            assert precision[d].item() == pytest.approx((predicted_d & true_d).sum().item() / predicted_d.sum().item())


def test_confusion_matrix_on_known_labels():
    """Rows are true digits and columns predictions, counted exactly."""
    matrix = metrics.confusion_matrix(torch.tensor([0, 0, 1, 9]), torch.tensor([0, 1, 1, 0]))
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[1, 1] == 1 and matrix[9, 0] == 1 and matrix.sum() == 4


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda tmp, run: tmp / "missing.pt", "no checkpoint at"),
        (lambda tmp, run: (tmp / "x.pt").write_text("hello") and tmp / "x.pt", "is not a readable checkpoint"),
    ],
)
def test_bad_checkpoint_paths_are_one_line_errors(tmp_path, trained_run, run_evaluate, make_path, message):
    """A missing or non-checkpoint file makes evaluate.py exit 2 with one line, before reading any data."""
    result = run_evaluate(make_path(tmp_path, trained_run), "--data-dir", tmp_path / "nowhere", "--no-download")
    assert message in one_line_error(result)


def test_checkpoint_of_a_mismatched_model_is_one_line_error(trained_run, tmp_path, run_evaluate):
    """Weights that do not fit their named model are reported in one line by evaluate.py."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["model_name"], ckpt["model_args"] = "fcnn", {"hidden": 8}
    torch.save(ckpt, tmp_path / "wrong.pt")
    assert "do not fit a fcnn model" in one_line_error(run_evaluate(tmp_path / "wrong.pt"))


def test_data_dir_without_mnist_and_download_off(trained_run, tmp_path, run_evaluate):
    """evaluate.py with no data and --no-download says where it looked and how to fix it."""
    result = run_evaluate(trained_run / "best.pt", "--data-dir", tmp_path, "--no-download")
    assert f"MNIST is not in {tmp_path}/MNIST/raw or {tmp_path}; drop --no-download" in one_line_error(result)


def test_figures_folder_that_cannot_be_made(trained_run, mnist_dir, tmp_path, run_evaluate):
    """An --out-dir inside a file is reported in one line; the evaluation itself is not lost from the output."""
    (tmp_path / "file").write_text("")
    result = run_evaluate(trained_run / "best.pt", "--data-dir", mnist_dir, "--out-dir", tmp_path / "file" / "figs")
    using, line = result.stderr.splitlines()  # the checkpoint it evaluated, then the one error
    assert result.returncode == 2 and using.startswith("using ") and line.startswith("error: cannot write figures to")
    assert "accuracy" in result.stdout


def test_notebook_runs_top_to_bottom(trained_run, monkeypatch):
    """The inference notebook executes every cell against a freshly trained checkpoint, without errors."""
    monkeypatch.setenv("MNIST_CHECKPOINT", str(trained_run / "best.pt"))
    notebook = nbformat.read(ROOT / "notebooks" / "inference.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit it with outputs cleared"
    )
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "looks like a" in outputs and "from epoch" in outputs
