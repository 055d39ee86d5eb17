import pytest
import torch
import torch.nn.functional as F

import augment
import evaluate
import train
from config import Config
from conftest import N_TRAIN, fast_args
from data import MNIST_MEAN, MNIST_STD, load_splits, normalize
from model import load_checkpoint, predict

STEPS_PER_EPOCH = (N_TRAIN - 100) // 50  # fast_args: val 100, batch 50
STRONG = Config(aug_rotate=30.0, aug_scale=0.2, aug_shear=15.0, aug_shift=4.0)


def digits(n: int = 16) -> torch.Tensor:
    """n different normalised digit-like images (N, 1, 28, 28): random strokes on black."""
    generator = torch.Generator().manual_seed(0)
    raw = (torch.rand(n, 28, 28, generator=generator) > 0.8).to(torch.uint8) * 255
    raw[:, :4], raw[:, -4:], raw[:, :, :4], raw[:, :, -4:] = 0, 0, 0, 0  # a black margin, as MNIST has
    return normalize(raw)


def ring(n: int) -> torch.Tensor:
    """n copies of a ring around the image centre (13.5, 13.5), whose centre of mass is exactly there."""
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    radius = ((x - 13.5) ** 2 + (y - 13.5) ** 2).sqrt()
    raw = ((radius > 4) & (radius < 7)).to(torch.uint8) * 255
    return normalize(raw.expand(n, 28, 28))


def ink(images: torch.Tensor) -> torch.Tensor:
    """Each image's pixels back in [0, 1]: 0 black, 1 white. (N, 28, 28)"""
    return (images[:, 0] * MNIST_STD + MNIST_MEAN).clamp(min=0)


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) as (x, y) in pixels."""
    mass = ink(images)
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    total = mass.sum((1, 2))
    return torch.stack([(mass * x).sum((1, 2)) / total, (mass * y).sum((1, 2)) / total], dim=1)


def test_the_same_batch_step_and_seed_give_bitwise_the_same_warp_and_leave_the_global_rng_alone():
    """augment.batch is a pure function of (images, config, epoch, step): equal inputs, equal outputs, no global RNG."""
    images, cfg = digits(), Config()
    rng = torch.get_rng_state()
    a = augment.batch(images, cfg, epoch=2, step=5, whole=len(images))
    b = augment.batch(images.clone(), cfg, epoch=2, step=5, whole=len(images))
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("change", [{"epoch": 3}, {"step": 6}, {"seed": 1}])
def test_another_epoch_step_or_seed_gets_another_warp(change):
    """Changing the epoch, the step or the seed changes every image's warp."""
    images, where = digits(), {"epoch": 2, "step": 5, "seed": 0}
    a = augment.batch(images, Config(seed=where["seed"]), where["epoch"], where["step"], len(images))
    where.update(change)
    b = augment.batch(images, Config(seed=where["seed"]), where["epoch"], where["step"], len(images))
    assert all(not torch.equal(x, y) for x, y in zip(a, b))


def test_each_position_in_the_batch_gets_its_own_warp():
    """The same image at every position of a batch comes out differently at each."""
    out = augment.batch(digits(1).expand(8, 1, 28, 28), Config(), 0, 0, 8)
    assert len({tuple(image.flatten().tolist()) for image in out}) == 8


@pytest.mark.parametrize("whole, world", [(8, 2), (7, 2), (7, 3), (50, 4)])
def test_the_ranks_shares_put_together_are_the_one_process_batch(whole, world):
    """Each torchrun rank warps its share of a batch (cut as MNISTData.batches cuts it) as one process warps it."""
    images, cfg = digits(whole), Config()
    one = augment.batch(images, cfg, 1, 3, whole)
    parts = images.tensor_split(world)
    shares = [augment.batch(part, cfg, 1, 3, whole, rank, world) for rank, part in enumerate(parts)]
    assert torch.equal(torch.cat(shares), one)


@pytest.mark.parametrize("cfg", [Config(), STRONG])
def test_what_comes_in_from_outside_the_image_is_mnist_black(cfg):
    """Warping the normalised batch equals warping the raw pixels with black (0) padding, then normalising."""
    images = normalize(torch.full((16, 28, 28), 255, dtype=torch.uint8))  # all white: every pixel brought in shows
    out = augment.batch(images, cfg, 0, 0, 16)
    grid = F.affine_grid(augment.affine_matrices(cfg, 16, 0, 0).float(), [16, 1, 28, 28], align_corners=False)
    reference = (F.grid_sample(torch.ones(16, 1, 28, 28), grid, align_corners=False) - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(out, reference)
    assert out.min() < -0.4 and torch.equal(
        augment.batch(normalize(torch.zeros(4, 28, 28, dtype=torch.uint8)), cfg, 0, 0, 4),
        normalize(torch.zeros(4, 28, 28)),
    )


@pytest.mark.parametrize("cfg", [Config(), STRONG])
def test_a_warped_digit_keeps_its_ink_and_its_centre_moves_at_most_the_shift(cfg):
    """The ink changes by the area the scale allows, and the centre of mass moves at most aug_shift per axis."""
    images = ring(64)
    out = augment.batch(images, cfg, 0, 0, 64)
    mass = ink(out).sum((1, 2)) / ink(images).sum((1, 2))
    assert mass.min() >= (1 - cfg.aug_scale) ** 2 * 0.97 and mass.max() <= (1 + cfg.aug_scale) ** 2 * 1.03
    moved = (centre_of_mass(out) - centre_of_mass(images)).abs()
    assert moved.max() <= cfg.aug_shift + 0.05
    assert moved.max() > cfg.aug_shift / 2  # it does move: the shift is not lost


def test_no_augment_returns_the_batch_untouched():
    """With augment off, batch() hands back the very tensor it was given and draws nothing."""
    images, rng = digits(), torch.get_rng_state()
    assert augment.batch(images, Config(augment=False), 0, 0, len(images)) is images
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_augment_trains_exactly_as_the_loop_without_augmentation(mnist_dir, tmp_path, monkeypatch):
    """--no-augment gives bitwise the weights of training with augment.batch taken out; augmenting changes them."""
    assert train.main(fast_args(mnist_dir, tmp_path / "off", "--no-augment")) == 0
    assert train.main(fast_args(mnist_dir, tmp_path / "on")) == 0
    monkeypatch.setattr(augment, "batch", lambda images, *args: images)
    assert train.main(fast_args(mnist_dir, tmp_path / "none")) == 0
    off, on, none = (load_checkpoint(tmp_path / name / "last.pt")[0].state_dict() for name in ("off", "on", "none"))
    assert all(torch.equal(off[k], none[k]) for k in off)
    assert not torch.equal(off["conv1.weight"], on["conv1.weight"])


def test_only_training_batches_are_augmented(mnist_dir, tmp_path, monkeypatch):
    """augment.batch runs once per training step and never in validation, test, evaluate.py or predict()."""
    calls = []
    real = augment.batch
    monkeypatch.setattr(augment, "batch", lambda *args: calls.append(args[3]) or real(*args))
    assert train.main(fast_args(mnist_dir, tmp_path, "--epochs", 2)) == 0
    assert calls == list(range(STEPS_PER_EPOCH)) * 2
    assert (
        evaluate.main(
            [
                "--data-dir",
                str(mnist_dir),
                "--no-download",
                "--out-dir",
                str(tmp_path / "eval"),
                str(tmp_path / "best.pt"),
            ]
        )
        == 0
    )
    model, ckpt = load_checkpoint(tmp_path / "best.pt")
    test = load_splits(mnist_dir, 100, 0, download=False)["test"]
    classes, _ = predict(model, test.images, prepare=False)
    assert len(calls) == 2 * STEPS_PER_EPOCH
    assert (classes == test.labels).sum().item() / len(classes) == ckpt["test_acc"]  # plain images, as training scored


def test_resume_keeps_the_augmentation_and_refuses_to_change_it(mnist_dir, tmp_path):
    """The amounts are saved in the checkpoint's config; --resume keeps them and refuses a new amount."""
    assert train.main(fast_args(mnist_dir, tmp_path, "--aug-rotate", 7)) == 0
    ckpt = load_checkpoint(tmp_path / "last.pt")[1]
    assert ckpt["config"]["augment"] is True and ckpt["config"]["aug_rotate"] == 7.0
    assert not {"augment", "aug_rotate", "aug_scale", "aug_shear", "aug_shift"} & train.RESUMABLE_CHANGES
    with pytest.raises(Exception, match=r"cannot resume.*aug_rotate 7\.0 -> 5\.0"):
        train.resume_config(ckpt["config"], ["--aug-rotate", "5"])
    assert train.resume_config(ckpt["config"], ["--epochs", "2"]).aug_rotate == 7.0
