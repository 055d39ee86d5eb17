"""MNIST from the layouts people have: torchvision's MNIST/raw/ or the four files loose, each plain or .gz."""

import gzip
import hashlib
import shutil

import pytest
import torch
import torchvision

import data
import train
from config import UserError
from conftest import REAL_DATA, fast_args, needs_real_data, write_mnist
from data import ALL_FILES, RAW_FILES, load_split, load_splits
from model import load_checkpoint

TRAIN_IMAGES, TRAIN_LABELS = RAW_FILES["train"]
TEST_IMAGES, TEST_LABELS = RAW_FILES["test"]


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test: torchvision's MNIST is replaced by a function that raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("MNIST was downloaded although a layout holds the four files")

    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)


def assert_same_splits(a: dict, b: dict) -> None:
    for name in ("train", "val", "test"):
        assert torch.equal(a[name].images, b[name].images) and torch.equal(a[name].labels, b[name].labels)


@pytest.mark.parametrize(
    "folder, gz",
    [
        ("MNIST/raw", ALL_FILES),
        (".", ()),
        (".", ALL_FILES),
        ("MNIST/raw", [TRAIN_IMAGES, TEST_LABELS]),
        (".", [TRAIN_LABELS, TEST_IMAGES]),
    ],
    ids=["raw-gz", "flat", "flat-gz", "raw-mixed", "flat-mixed"],
)
def test_every_layout_loads_the_same_splits(mnist_dir, tmp_path, no_download, folder, gz):
    """MNIST/raw/ or flat, each file plain or .gz: the same tensors as the plain MNIST/raw/ layout, with no download."""
    write_mnist(tmp_path, folder=folder, gz=gz)
    assert {p.name for p in (tmp_path / folder).iterdir() if p.is_file()} == {
        f"{name}.gz" if name in gz else name for name in ALL_FILES
    }
    assert_same_splits(load_splits(tmp_path, 100, 0, download=True), load_splits(mnist_dir, 100, 0, download=False))


def test_a_plain_file_wins_over_its_gz_and_raw_over_flat(mnist_dir, tmp_path, no_download):
    """torchvision leaves both x and x.gz in MNIST/raw/: the plain one is read; a complete MNIST/raw/ wins over flat."""
    shutil.copytree(mnist_dir, tmp_path, dirs_exist_ok=True)
    for name in ALL_FILES:
        (tmp_path / "MNIST" / "raw" / f"{name}.gz").write_bytes(b"not gzip")
        (tmp_path / name).write_bytes(b"not IDX")
    assert_same_splits(load_splits(tmp_path, 100, 0, download=True), load_splits(mnist_dir, 100, 0, download=False))


def gz_file(root):
    """A flat .gz layout under root and its train images file, for a test to damage."""
    write_mnist(root, folder=".", gz=ALL_FILES)
    return root / f"{TRAIN_IMAGES}.gz"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or damaged gzip file"),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated or damaged gzip file"),  # only the length trailer cut
        (lambda p: p.write_bytes(gzip.decompress(p.read_bytes())), "truncated or damaged gzip file"),  # not gzip at all
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), "is truncated or corrupt"),
        (lambda p: p.write_bytes(gzip.compress(b"<html>404 Not Found</html>")), "wrong magic number"),
    ],
    ids=["truncated", "no-trailer", "not-gzip", "short-content", "wrong-content"],
)
def test_a_bad_gz_is_a_one_line_error_naming_it(tmp_path, damage, message):
    """A cut-off or damaged .gz, or a whole one holding bad IDX content, is named in one line, with no download."""
    path = gz_file(tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message) as err:
        load_split(tmp_path, train=True, download=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_recompressed_gz_is_read_not_downloaded(mnist_dir, tmp_path, no_download):
    """A .gz compressed differently (other bytes, another checksum) holding the same IDX bytes reads the same."""
    for name in ALL_FILES:
        plain = (mnist_dir / "MNIST" / "raw" / name).read_bytes()
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(plain, compresslevel=1, mtime=12345))
    assert_same_splits(load_splits(tmp_path, 100, 0, download=True), load_splits(mnist_dir, 100, 0, download=False))


@needs_real_data
def test_real_mnist_recompressed_reads_the_same_without_download(tmp_path, no_download):
    """The real files gzipped anew (checksums unlike the official .gz torchvision checks) load to the same tensors."""
    official = dict(torchvision.datasets.mnist.MNIST.resources)
    for name in ALL_FILES:
        packed = gzip.compress((REAL_DATA / "MNIST" / "raw" / name).read_bytes(), compresslevel=1, mtime=0)
        assert hashlib.md5(packed).hexdigest() != official[f"{name}.gz"]
        (tmp_path / f"{name}.gz").write_bytes(packed)
    for train_split in (True, False):
        for a, b in zip(load_split(tmp_path, train_split, download=True), load_split(REAL_DATA, train_split, False)):
            assert torch.equal(a, b)


def test_partial_layouts_are_described_in_the_error(tmp_path):
    """With no complete layout and download off, the error says which folder holds which files and what is missing."""
    write_mnist(tmp_path, folder=".", gz=[TRAIN_IMAGES])
    (tmp_path / TEST_IMAGES).unlink()
    (tmp_path / TEST_LABELS).unlink()
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / TEST_LABELS).write_bytes(b"")
    with pytest.raises(UserError) as err:
        load_split(tmp_path, train=True, download=False)
    assert str(err.value) == (
        f"MNIST is not in {tmp_path}/MNIST/raw or {tmp_path} ({tmp_path}/MNIST/raw holds 1 of the 4 files, missing "
        f"{TRAIN_IMAGES}, {TRAIN_LABELS}, {TEST_IMAGES}; {tmp_path} holds 2 of the 4 files, missing {TEST_IMAGES}, "
        f"{TEST_LABELS}); drop --no-download to fetch it, or put the four IDX files (plain or .gz) in one of them"
    )


def test_a_partial_layout_with_download_on_downloads(tmp_path, monkeypatch, capsys):
    """A layout missing a file does not stop the download; the line announcing it says what was there."""
    write_mnist(tmp_path, folder=".")
    (tmp_path / TEST_LABELS).unlink()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(UserError, match=f"could not download MNIST into {tmp_path}/MNIST/raw"):
        load_split(tmp_path, train=True, download=True)
    assert f"({tmp_path} holds 3 of the 4 files, missing {TEST_LABELS})" in capsys.readouterr().out


def test_training_on_flat_gz_files_matches_training_on_mnist_raw(trained_run, tmp_path):
    """train.py on the four .gz files loose in --data-dir trains bitwise like it does on the plain MNIST/raw/ files."""
    gz_dir = write_mnist(tmp_path / "data", folder=".", gz=ALL_FILES)
    assert train.main(fast_args(gz_dir, tmp_path / "run", "--epochs", 2)) == 0
    a, b = (load_checkpoint(run / "last.pt")[0].state_dict() for run in (trained_run, tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gz_is_never_unzipped_to_disk(tmp_path, no_download):
    """Reading .gz files leaves the folder exactly as it was: no unzipped copy beside them."""
    write_mnist(tmp_path, folder=".", gz=ALL_FILES)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load_splits(tmp_path, 100, 0, download=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert data.find_files(tmp_path)[0] == {name: tmp_path / f"{name}.gz" for name in ALL_FILES}
