"""How each torchrun rank takes its share of every batch, down to shares that are empty (issue 19, bug 1)."""

import math
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import distributed
import train
from config import parse_args
from conftest import ROOT, fast_args
from data import MNISTData, load_splits, normalize
from model import CNN, model_logits


def numbered(n: int) -> MNISTData:
    """n images whose every pixel holds the image's index mod 256, and whose label is its index mod 10."""
    images = (torch.arange(n) % 256).to(torch.uint8)[:, None, None].expand(n, 28, 28).contiguous()
    return MNISTData(images, torch.arange(n) % 10)


@pytest.mark.parametrize("n, batch_size, world", [(10, 4, 1), (10, 4, 2), (9, 4, 3), (7, 2, 3), (5, 5, 4), (1, 3, 2)])
def test_the_ranks_shares_make_up_each_batch_once(n, batch_size, world):
    """Across the ranks, each batch's shares are the batch in order, differ in size by at most one, and may be empty."""
    split, order = numbered(n), torch.randperm(n, generator=torch.Generator().manual_seed(n))
    for start in range(math.ceil(n / batch_size)):
        per_rank = [list(split.batches(batch_size, order, start=start, rank=r, world=world)) for r in range(world)]
        assert all(len(batches) == math.ceil(n / batch_size) - start for batches in per_rank)  # every rank, every step
        for step, shares in enumerate(zip(*per_rank), start):
            batch = order[step * batch_size : (step + 1) * batch_size]
            assert torch.equal(torch.cat([labels for _, labels in shares]), split.labels[batch])
            assert torch.equal(torch.cat([images for images, _ in shares]), normalize(split.images[batch]))
            sizes = [len(labels) for _, labels in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


class Recorder:
    """A TensorBoard stand-in that keeps what it is given."""

    def __init__(self):
        self.steps = []

    def step(self, loss, lr, step):
        self.steps.append((step, loss))


def test_a_rank_whose_share_of_the_last_batch_is_empty_finishes_its_epoch(mnist_dir, monkeypatch):
    """Rank 1 of 2 trains an epoch whose last batch holds 1 image (its share: none), logging every step, and
    validates a split with fewer images than ranks, without dividing by zero."""
    splits = load_splits(mnist_dir, 99, 0, download=False)  # 501 training images: batches of 50, then 1
    cfg = parse_args(fast_args(mnist_dir, "unused", "--val-size", 99, "--log-every", 1))
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "sum_all", lambda *values: list(values))  # no other rank to add
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: flag)
    torch.manual_seed(0)
    model = CNN()
    optimizer, scheduler = train.make_optimizer(model, cfg, steps_per_epoch=11)
    state = train.State(
        cfg,
        None,
        torch.device("cpu"),
        splits,
        model,
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cpu", enabled=False),
        Recorder(),
        {"epoch_progress": train.new_progress()},
    )
    progress = train.train_epoch(state, 0, lambda: False)
    assert progress["step"] == 11 and progress["seen"] == 250  # 25 of each of the ten full batches, none of the last
    assert [step for step, _ in state.writer.steps] == list(range(1, 12))
    assert state.writer.steps[-1][1] == 0.0  # its share of the last batch's loss: nothing
    one_image = MNISTData(splits["val"].images[:1], splits["val"].labels[:1])
    assert train.validate(model, one_image, 500) == (0.0, 0.0)  # rank 1's share is empty; rank 0 adds the image


def test_scoring_no_images_gives_no_logits():
    """model_logits of zero images is an empty (0, 10) tensor, as a rank with an empty share of a split needs."""
    assert model_logits(CNN(), torch.zeros(0, 28, 28, dtype=torch.uint8)).shape == (0, 10)


def step_losses(run_dir) -> list[tuple[int, float]]:
    reader = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    reader.Reload()
    return [(event.step, event.value) for event in reader.Scalars("step/loss")]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
@pytest.mark.slow  # starts torchrun
def test_torchrun_with_an_empty_share_logs_the_one_process_loss(mnist_dir, tmp_path):
    """Issue 19's reproduction on the synthetic data: 2 processes with a last batch of 1 image finish, and the step
    loss they log is the whole batch's, as one process logs it."""
    args = fast_args(mnist_dir, tmp_path / "two", "--val-size", 99, "--log-every", 1)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "train.py"),
        *map(str, args),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=170, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lost the other processes" not in result.stderr
    assert train.main(fast_args(mnist_dir, tmp_path / "one", "--val-size", 99, "--log-every", 1)) == 0
    two, one = step_losses(tmp_path / "two"), step_losses(tmp_path / "one")
    assert [step for step, _ in two] == [step for step, _ in one] == list(range(1, 12))
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-3)
