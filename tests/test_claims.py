"""Promises of the README and docs that no other test held: each test here failed with the feature taken out."""

import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import record_writer

import tblog
from config import Config


def test_an_epochs_curves_are_on_disk_when_its_row_is_printed(tmp_path, monkeypatch):
    """docs/training.md: each epoch's events are flushed before its row is printed, so a run killed then (even with
    kill -9) leaves that epoch's curves readable, even when TensorBoard's writer thread lags (here: a slow disk)."""
    write = record_writer.RecordWriter.write
    monkeypatch.setattr(record_writer.RecordWriter, "write", lambda self, data: time.sleep(0.05) or write(self, data))
    writer = tblog.open_writer(Config(), tmp_path, None, main=True)
    try:
        row = {"train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.25, "val_acc": 0.9, "seconds": 2.0}
        writer.epoch(row, 10, 500)
        reader = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
        reader.Reload()
        assert [(event.step, event.value) for event in reader.Scalars("loss/val")] == [(10, 0.25)]
    finally:
        writer.close()
