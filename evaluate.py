"""Evaluate checkpoints on the MNIST test set, compare them side by side, and draw figures.

python evaluate.py                                  # the latest run's best.pt; figures in its folder's eval/
python evaluate.py runs/20261130-142301-cnn/best.pt runs/20261130-150944-fcnn/best.pt --out-dir docs
"""

import argparse
import statistics
import sys
from pathlib import Path

import plots
from config import Config, Parser, UserError, exit_script
from data import MNISTData, load_split
from metrics import confusion_matrix, per_class, scores
from model import count_parameters, load_checkpoint, model_logits
from rundir import describe_checkpoint, find_checkpoint


def epochs_to(history: list[dict], accuracy: float) -> int | None:
    """The first epoch whose validation accuracy reached `accuracy`, or None."""
    return next((row["epoch"] for row in history if row["val_acc"] >= accuracy), None)


def evaluate_checkpoint(path: Path, model, ckpt: dict, test: MNISTData, batch_size: int) -> dict:
    """Test-set numbers of one loaded checkpoint, plus what its training history says."""
    logits = model_logits(model, test.images, batch_size)
    loss, accuracy = scores(logits, test.labels)
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    history = ckpt.get("history", [])
    return {
        "path": path,
        "model": model,
        "name": ckpt["model_name"],
        "parameters": count_parameters(model),
        "history": history,
        "best_epoch": ckpt.get("best_epoch"),
        "val_acc": ckpt.get("best_val_acc"),
        "stored_test_acc": ckpt.get("test_acc"),
        "test_loss": loss,
        "test_acc": accuracy,
        "predicted": predicted,
        "confidence": confidence,
        "matrix": confusion_matrix(test.labels, predicted),
        "seconds_per_epoch": statistics.median(row["seconds"] for row in history) if history else None,
        "epochs_to_98": epochs_to(history, 0.98),
    }


def labels_for(paths: list[Path]) -> list[str]:
    """Short names for the runs, from their folders (runs/cnn/best.pt -> cnn), made unique."""
    names = [p.resolve().parent.name for p in paths]
    return [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names)]


def format_report(label: str, result: dict) -> str:
    precision, recall = per_class(result["matrix"])
    lines = [
        f"{label} ({result['path']}): {result['name']}, {result['parameters']:,} parameters",
        f"  test loss {result['test_loss']:.4f}, accuracy {result['test_acc']:.2%}",
        "  digit      " + " ".join(f"{d:>6}" for d in range(10)),
        "  precision  " + " ".join(f"{p:>6.2%}" for p in precision.tolist()),
        "  recall     " + " ".join(f"{r:>6.2%}" for r in recall.tolist()),
    ]
    return "\n".join(lines)


def format_comparison(results: dict[str, dict]) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    # The first two columns are as wide as their longest entry: run names are timestamps or whatever --run-name was.
    run_w = max(len("run"), *(len(label) for label in results))
    model_w = max(len("model"), *(len(r["name"]) for r in results.values()))
    header = (
        f"{'run':<{run_w}} {'model':<{model_w}} {'params':>9} {'best ep':>8} {'ep to 98%':>9} {'val acc':>8} "
        f"{'test acc':>8} {'s/epoch':>8}"
    )
    rows = [
        f"{label:<{run_w}} {r['name']:<{model_w}} {r['parameters']:>9,} {cell(r['best_epoch'], 'd'):>8} "
        f"{cell(r['epochs_to_98'], 'd'):>9} {cell(r['val_acc'], '.2%'):>8} {r['test_acc']:>8.2%} "
        f"{cell(r['seconds_per_epoch'], '.1f'):>8}"
        for label, r in results.items()
    ]
    return "\n".join([header, *rows])


def draw_figures(results: dict[str, dict], test: MNISTData, out_dir: Path) -> list[Path]:
    histories = {label: r["history"] for label, r in results.items() if r["history"]}
    written = [plots.plot_curves(histories, out_dir / "curves.png")] if histories else []
    for label, r in results.items():
        title = f"{label} ({r['name']}), test accuracy {r['test_acc']:.2%}"
        written.append(plots.plot_confusion(r["matrix"].numpy(), out_dir / f"confusion_{label}.png", title))
        written.append(
            plots.plot_mistakes(
                test.images.numpy(),
                test.labels.tolist(),
                r["predicted"].tolist(),
                r["confidence"].tolist(),
                out_dir / f"mistakes_{label}.png",
                title,
            )
        )
        if hasattr(r["model"], "conv1"):
            written.append(
                plots.plot_filters(
                    r["model"].conv1.weight.detach().cpu().numpy(),
                    out_dir / f"filters_{label}.png",
                    f"{label}: first-layer filters",
                )
            )
    return written


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "checkpoints",
        nargs="*",
        type=Path,
        help="best.pt or last.pt files, run folders, or run names in runs/ (default: the latest run's best.pt)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder holding MNIST, plain or .gz, in MNIST/raw/ or loose (default: the first checkpoint's data_dir)",
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download MNIST into the data dir if it is missing (default: on)",
    )
    parser.add_argument(
        "--out-dir", type=Path, help="folder for the figures (default: eval/ in the first checkpoint's run folder)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Config().eval_batch_size,
        help="evaluation batch size (default: config.py's eval_batch_size)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
        args.checkpoints = [find_checkpoint(given, Config().out_dir) for given in args.checkpoints or [None]]
        loaded = [load_checkpoint(path) for path in args.checkpoints]  # a bad path fails before the data is read
        # The figures belong to the run they describe, not beside it among the run folders.
        args.out_dir = args.out_dir or args.checkpoints[0].parent / "eval"
        data_dir = args.data_dir or loaded[0][1].get("config", {}).get("data_dir", "data")
        test = MNISTData(*load_split(data_dir, train=False, download=args.download))
        for path, (_, ckpt) in zip(args.checkpoints, loaded):  # on stderr: stdout is the report
            print(describe_checkpoint(path, ckpt), file=sys.stderr, flush=True)
        results = {
            label: evaluate_checkpoint(path, model, ckpt, test, args.batch_size)
            for label, path, (model, ckpt) in zip(labels_for(args.checkpoints), args.checkpoints, loaded)
        }
        for label, result in results.items():
            print(format_report(label, result))
        if len(results) > 1:
            print("\n" + format_comparison(results))
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot write figures to {args.out_dir} ({e.strerror}); pass --out-dir with a writable folder"
            ) from None
        written = draw_figures(results, test, args.out_dir)
        print(f"\nfigures: {', '.join(str(p) for p in written)}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_script(main())
