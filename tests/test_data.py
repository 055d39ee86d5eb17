import gzip
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import data
from config import UserError
from conftest import (
    N_TEST,
    N_TRAIN,
    REAL_DATA,
    needs_real_data,
    serve_folder,
    synthetic_digits,
    use_mirror,
    write_idx,
    write_mnist,
)
from data import ALL_FILES, MNIST_MEAN, MNIST_STD, RAW_FILES, MNISTData, load_split, load_splits


def test_splits_have_the_right_sizes_and_items(mnist_dir):
    """Train and val partition the training file, test is the test file; ds[i] is (float 1x28x28, int)."""
    splits = load_splits(mnist_dir, val_size=100, split_seed=0, download=False)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [N_TRAIN - 100, 100, N_TEST]
    image, label = splits["train"][0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert type(label) is int and 0 <= label <= 9


def test_items_are_normalised_with_the_mnist_constants(mnist_dir):
    """ds[i] equals (pixels / 255 - MNIST_MEAN) / MNIST_STD of the file's own bytes, in the file's order."""
    images, labels = synthetic_digits(N_TEST, seed=2)  # what conftest wrote as the test file
    test = load_splits(mnist_dir, val_size=100, split_seed=0, download=False)["test"]
    image, label = test[5]
    expected = (torch.from_numpy(images[5]).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(image[0], expected, atol=1e-5)
    assert label == labels[5]


def test_a_per_image_transform_is_refused_rather_than_ignored(mnist_dir):
    """MNISTData takes no transform: training reads whole batches, never ds[i], so one would silently do nothing."""
    test = load_splits(mnist_dir, val_size=100, split_seed=0, download=False)["test"]
    with pytest.raises(TypeError, match="transform"):
        MNISTData(test.images, test.labels, transform=lambda image: image.flip(-1))


def test_split_is_disjoint_and_deterministic(mnist_dir):
    """Val and train share no image, the same seed gives the same split, another seed another split."""

    def val_images(seed):
        return load_splits(mnist_dir, val_size=100, split_seed=seed, download=False)

    a, b, c = val_images(0), val_images(0), val_images(1)
    train_rows = {bytes(x.numpy()) for x in a["train"].images}
    assert not train_rows & {bytes(x.numpy()) for x in a["val"].images}
    assert len(train_rows) + len(a["val"]) == N_TRAIN  # synthetic images are all distinct
    assert torch.equal(a["val"].images, b["val"].images) and torch.equal(a["val"].labels, b["val"].labels)
    assert not torch.equal(a["val"].images, c["val"].images)


def test_batches_cover_the_split_once_in_the_given_order(mnist_dir):
    """batches() yields every item exactly once, normalised, in `order`, from batch `start` on."""
    split = load_splits(mnist_dir, val_size=100, split_seed=0, download=False)["train"]
    order = data.epoch_order(len(split), seed=0, epoch=3, device="cpu")
    labels = torch.cat([y for _, y in split.batches(64, order)])
    assert torch.equal(labels, split.labels[order])
    images, _ = next(split.batches(64, order, start=2))
    assert torch.equal(images, data.normalize(split.images[order[128:192]]))
    assert torch.equal(order, data.epoch_order(len(split), 0, 3, "cpu"))
    assert not torch.equal(order, data.epoch_order(len(split), 0, 4, "cpu"))


@pytest.fixture
def damaged(mnist_dir, tmp_path):
    """A private copy of the synthetic data dir that a test may break."""
    shutil.copytree(mnist_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_missing_data_with_download_off_says_where_and_how(tmp_path):
    """Missing files with download off: one line naming the expected folder and the two fixes."""
    with pytest.raises(
        UserError, match=rf"MNIST is not in {tmp_path}/MNIST/raw or {tmp_path}; drop --no-download to fetch it"
    ):
        load_split(tmp_path, train=True, download=False)


@pytest.fixture
def half_mirror(tmp_path, monkeypatch):
    """torchvision's MNIST pointed at a loopback server that has the first file it asks for and refuses the rest,
    as a connection lost part-way would: the download writes one file, then fails."""
    served = tmp_path / "mirror"
    served.mkdir()
    (served / f"{ALL_FILES[0]}.gz").write_bytes(gzip.compress(b"half a download"))
    with serve_folder(served) as url:
        use_mirror(monkeypatch, url)
        yield


def tree(root):
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("before", ["nothing", "a user's files"])
def test_failed_download_names_both_ways_out_and_leaves_nothing(half_mirror, tmp_path, before):
    """A download that fails part-way says to pass --data-dir or where to copy the files, and leaves the data dir as
    it found it but for its empty lock file: no data/MNIST/raw/ where there was none, no half-downloaded file, the
    user's own files untouched."""
    root = tmp_path / "data"
    if before != "nothing":
        write_mnist(root, n_train=20, n_test=10)
        for name in ALL_FILES[:3]:
            (root / "MNIST" / "raw" / name).unlink()  # one of the four is there, which is not enough
        (root / "notes.txt").write_text("mine")
    had = tree(root) if root.exists() else None
    with pytest.raises(UserError) as error:
        load_split(root, train=True, download=True)
    raw = root / "MNIST" / "raw"
    assert str(error.value).startswith(f"could not download MNIST into {raw} (HTTP Error 404")
    assert f"pass --data-dir with the folder that holds them, or copy them into {raw}; else" in str(error.value)
    assert tree(root) == {**(had or {}), Path(data.DOWNLOAD_LOCK): b""}


class MeanwhileHandler(http.server.BaseHTTPRequestHandler):
    """A mirror that fails every request, after calling `meanwhile()`: what other processes do while a download
    runs happens then."""

    meanwhile = staticmethod(lambda: None)

    def do_GET(self):
        type(self).meanwhile()
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a_failed_download_removes_only_what_it_wrote(tmp_path, monkeypatch):
    """Files that another process makes under the data dir while a download fails (a job's results, a user's file
    beside the downloaded ones) survive; the lock file stays, since another process may be waiting on it."""
    root = tmp_path / "shared"
    theirs = [root / "job2" / "results.csv", root / "MNIST" / "raw" / "notes.txt", root / "MNIST" / "mine.txt"]

    def another_process_writes():
        for path in theirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("theirs")

    monkeypatch.setattr(MeanwhileHandler, "meanwhile", staticmethod(another_process_writes))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MeanwhileHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        use_mirror(monkeypatch, f"http://127.0.0.1:{server.server_port}/")
        with pytest.raises(UserError, match="could not download MNIST"):
            load_split(root, train=True, download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert all(path.read_text() == "theirs" for path in theirs)
    assert (root / data.DOWNLOAD_LOCK).is_file()
    left = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert left == {data.DOWNLOAD_LOCK, "job2/results.csv", "MNIST/raw/notes.txt", "MNIST/mine.txt"}


def test_data_dir_that_is_a_file(tmp_path):
    """A data dir that is a file gets its own message, not a download attempt."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        load_split(tmp_path / "file", train=True, download=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "is truncated or corrupt"),
        (lambda p: p.write_bytes(b"\x00\x00\x08\x01" + p.read_bytes()[4:]), "wrong magic number"),
        (lambda p: p.write_bytes(b""), "wrong magic number"),
    ],
)
def test_corrupt_file_is_named(damaged, damage, message):
    """A truncated or wrong-magic IDX file gets a one-line error naming that file."""
    path = damaged / "MNIST" / "raw" / RAW_FILES["train"][0]
    damage(path)
    with pytest.raises(UserError, match=message) as err:
        load_split(damaged, train=True, download=False)
    assert str(path) in str(err.value)


def test_unreadable_file_is_named(damaged, monkeypatch):
    """A file the OS will not let us read (tests run as root, so the refusal is simulated) is named with the reason."""

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", refuse, raising=False)  # data.py's own `open`, not the builtin
    with pytest.raises(UserError, match=rf"cannot read {damaged}/MNIST/raw/train-images-idx3-ubyte: Permission denied"):
        load_split(damaged, train=True, download=False)


def test_mismatched_label_file_is_named(damaged):
    """A label file whose count differs from its image file is caught before training."""
    write_idx(damaged / "MNIST" / "raw" / RAW_FILES["train"][1], np.zeros(N_TRAIN - 1, dtype=np.uint8))
    with pytest.raises(UserError, match=f"has {N_TRAIN - 1} labels for {N_TRAIN} images"):
        load_split(damaged, train=True, download=False)


def test_labels_outside_0_to_9_are_refused(damaged):
    """Labels that are not digits mean the file is not MNIST."""
    write_idx(damaged / "MNIST" / "raw" / RAW_FILES["test"][1], np.full(N_TEST, 12, dtype=np.uint8))
    with pytest.raises(UserError, match="labels outside 0-9"):
        load_split(damaged, train=False, download=False)


def test_val_size_larger_than_training_file(mnist_dir):
    """A validation split that would leave nothing to train on is refused."""
    with pytest.raises(UserError, match=f"val_size {N_TRAIN} leaves no training images"):
        load_splits(mnist_dir, val_size=N_TRAIN, split_seed=0, download=False)


@needs_real_data
def test_real_mnist_matches_its_published_statistics():
    """The real files load to 55k/5k/10k images with the known pixel mean/std and test label counts."""
    splits = load_splits(REAL_DATA, val_size=5000, split_seed=0, download=False)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    pixels = torch.cat([splits["train"].images, splits["val"].images]).float() / 255
    assert round(pixels.mean().item(), 4) == MNIST_MEAN and round(pixels.std().item(), 4) == MNIST_STD
    assert splits["test"].labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_real_data
@pytest.mark.parametrize("train", [True, False])
def test_reader_matches_torchvision_on_the_real_files(train):
    """load_split reads the real IDX files into exactly the tensors torchvision's own MNIST parser gives."""
    images, labels = load_split(REAL_DATA, train=train, download=False)
    reference = torchvision.datasets.MNIST(REAL_DATA, train=train, download=False)
    assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)
