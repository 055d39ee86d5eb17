"""TensorBoard logging, a side channel of training: `tensorboard --logdir runs` shows every run.

train.py makes one writer per run with `open_writer` and calls its four methods: `step`, `epoch`,
`test` and `close`. With --no-tensorboard, and on every torchrun rank but 0, the writer is a
`NoLog` with the same four methods doing nothing, so the loop has no `if` for logging.
"""

from dataclasses import asdict
from pathlib import Path

import plots
from config import Config, UserError
from metrics import confusion_matrix


def open_writer(cfg: Config, run_dir: Path, last_step: int | None, main: bool):
    """A TensorBoard writer into the run folder, or a NoLog when cfg.tensorboard is off or `main` is false.

    A resumed run passes the optimiser step its last.pt was saved at: the events that the interrupted run
    logged after it are hidden (purge_step), so its curves go on from there with no step twice."""
    if not (cfg.tensorboard and main):
        return NoLog()
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported only when it is used
    except ImportError:
        raise UserError(
            "tensorboard is not installed; pip install -r requirements.txt, or pass --no-tensorboard"
        ) from None
    return TensorBoard(SummaryWriter(run_dir, purge_step=None if last_step is None else last_step + 1), cfg)


class TensorBoard:
    """The run's curves, hyperparameters and test figures, at the optimiser step they belong to."""

    def __init__(self, writer, cfg: Config):
        self.writer, self.cfg = writer, cfg

    def step(self, loss: float, lr: float, step: int) -> None:
        """One optimiser step's loss (the whole batch's mean) and learning rate."""
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, row: dict, step: int, images: int) -> None:
        """The epoch's row of the printed table, at the optimiser step it ended on."""
        for split in ("train", "val"):
            self.writer.add_scalar(f"loss/{split}", row[f"{split}_loss"], step)
            self.writer.add_scalar(f"accuracy/{split}", row[f"{split}_acc"], step)
        self.writer.add_scalar("speed/epoch_seconds", row["seconds"], step)
        self.writer.add_scalar("speed/images_per_second", images / row["seconds"], step)
        self.writer.flush()  # so a killed run leaves every finished epoch readable

    def test(self, record: dict, logits, images, labels, step: int) -> None:
        """The test result (record's test_loss and test_acc), the config beside the final metrics for the HParams
        tab, and the confusion matrix and confident mistakes drawn from the test logits."""
        test_loss, test_acc, labels = record["test_loss"], record["test_acc"], labels.cpu()
        self.writer.add_scalar("test/loss", test_loss, step)
        self.writer.add_scalar("test/accuracy", test_acc, step)
        hparams = {k: v for k, v in asdict(self.cfg).items() if k not in ("data_dir", "out_dir", "run_name", "resume")}
        self.writer.add_hparams(
            hparams,
            {
                "hparam/test_accuracy": test_acc,
                "hparam/test_loss": test_loss,
                "hparam/best_val_accuracy": record["best_val_acc"],
            },
            run_name=".",
            global_step=step,
        )
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        title = f"{self.cfg.model}, test accuracy {test_acc:.2%}"
        self.writer.add_figure(
            "test/confusion_matrix",
            plots.confusion_figure(confusion_matrix(labels, predicted.cpu()).numpy(), title),
            step,
        )
        self.writer.add_figure(
            "test/confident_mistakes",
            plots.mistakes_figure(
                images.cpu().numpy(), labels.tolist(), predicted.tolist(), confidence.tolist(), title
            ),
            step,
        )

    def close(self) -> None:
        self.writer.close()


class NoLog:
    """TensorBoard's stand-in when logging is off: the same methods, doing nothing (and a typo still fails)."""

    def step(self, loss: float, lr: float, step: int) -> None:
        pass

    def epoch(self, row: dict, step: int, images: int) -> None:
        pass

    def test(self, record: dict, logits, images, labels, step: int) -> None:
        pass

    def close(self) -> None:
        pass
