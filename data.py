"""MNIST as tensors: torchvision's MNIST downloads the files, we keep each split as one tensor.

The reference post's `mnistData` keeps a Python list of PIL images and converts one
image per `__getitem__`. Here the same Dataset interface sits on one uint8 tensor per
split, so training slices whole batches out of memory with no per-sample work.
"""

import contextlib
import gzip
import io
import math
import os
import shutil
import zlib
from pathlib import Path

import filelock
import numpy as np
import torch
from torch.utils.data import Dataset

from config import UserError

# Mean and std of the 60,000 training pixels after scaling to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The four MNIST files, by split, as torchvision names them in <data_dir>/MNIST/raw/ (and the original site, plus .gz).
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = [name for names in RAW_FILES.values() for name in names]
DOWNLOAD_LOCK = ".mnist-download.lock"  # in the data folder, held while a process downloads into it
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (..., 28, 28) -> normalised float (..., 1, 28, 28), as the models expect."""
    return (images.unsqueeze(-3).float() - MNIST_MEAN * 255) / (MNIST_STD * 255)


class MNISTData(Dataset):
    """One MNIST split: `ds[i]` is (float tensor 1x28x28, int label), normalised like training.

    It takes no per-image transform: training slices whole batches (`batches`), never calling `ds[i]`, and
    warps them in augment.py, so a transform here would change nothing that trains."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images  # (N, 28, 28) uint8
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return normalize(self.images[i]), int(self.labels[i])

    def to(self, device) -> "MNISTData":
        return MNISTData(self.images.to(device), self.labels.to(device))

    def batches(self, batch_size: int, order: torch.Tensor, start: int = 0, rank: int = 0, world: int = 1):
        """Yield normalised (images, labels) batches in `order` (a permutation of the indices), from batch `start` on.

        With world > 1 processes, each batch of `batch_size` is cut in `world` parts and this yields part
        `rank`: all processes together see the same batches as one process would."""
        for first in range(start * batch_size, len(self), batch_size):
            index = order[first : first + batch_size].tensor_split(world)[rank]
            yield normalize(self.images[index]), self.labels[index]


def epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The shuffled order of epoch `epoch`. A pure function of (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


def _read_bytes(path: Path) -> memoryview:
    """All of a file's bytes, writable so numpy and torch can share them. A .gz is unzipped as it is read, into
    memory, never onto disk."""
    if path.suffix == ".gz":
        content = io.BytesIO()
        with gzip.open(path, "rb") as f:
            shutil.copyfileobj(f, content)
        return content.getbuffer()
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # one read straight into the final buffer: no copies
        return memoryview(data)[: f.readinto(data)]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file, plain or gzipped, as a uint8 array shaped as its header says. The header is checked against
    the bytes that follow; a wrong file gets one line naming it."""
    try:
        data = _read_bytes(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # only gzip raises these: a cut-off or damaged .gz
        raise UserError(f"{path} is a truncated or damaged gzip file ({e}); delete it and download again") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path} is not an MNIST IDX file (wrong magic number); delete it and download again")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_size + math.prod(dims)
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt ({len(data)} bytes, header says {expected}); delete it and download again"
        )
    if ndim == 3 and dims[1:] != [28, 28]:
        raise UserError(f"{path} holds {dims[1]}x{dims[2]} images, not 28x28 MNIST digits")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def find_files(root: Path) -> tuple[dict[str, Path] | None, list[str]]:
    """The four MNIST files from the first layout that holds them all, or None and a note on each partial layout.

    A layout is a folder (torchvision's <root>/MNIST/raw/, or <root> itself) holding each file plain or as
    .gz; a plain file wins over its .gz, as torchvision's download leaves both."""
    partial = []
    for folder in (root / "MNIST" / "raw", root):
        found = {}
        for name in ALL_FILES:
            found[name] = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        missing = [name for name, path in found.items() if path is None]
        if not missing:
            return found, []
        if len(missing) < len(ALL_FILES):
            partial.append(
                f"{folder} holds {len(ALL_FILES) - len(missing)} of the 4 files, missing {', '.join(missing)}"
            )
    return None, partial


def download_paths(root: Path) -> list[Path]:
    """Every path that torchvision's MNIST download writes under root, folders first: MNIST/, MNIST/raw/, and for
    each file its .gz and the plain file unpacked from it. It writes nothing else (torchvision 0.22 to 0.29)."""
    raw = root / "MNIST" / "raw"
    return [raw.parent, raw, *(raw / f for name in ALL_FILES for f in (f"{name}.gz", name))]


def _remove(paths: list[Path]) -> None:
    """Remove these paths, files before the folders that hold them; a folder only if it is empty, so a file that
    another process put there in the meantime stays, and its folder with it."""
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def download_files(root: Path, train: bool, found: str = "") -> None:
    """Download MNIST into root/MNIST/raw with torchvision, unless another process did while this one waited.

    torchrun's node_first leaves the download to one process per machine, but machines that share a file system
    (a cluster's home folder) would still download into one folder at once, which corrupts the files. A lock file
    in root lets one process download at a time; the others wait, then find its files and download nothing.
    A failed download removes what it wrote, so no empty data/MNIST/raw/ is left to puzzle the next run: the
    paths of download_paths that were not there once the lock was held, and nothing else. The lock file stays,
    since processes on this or another machine may be waiting on it; removing it would let two of them hold a
    lock each, one on the removed file and one on a new one."""
    raw = root / "MNIST" / "raw"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(root / DOWNLOAD_LOCK)
        try:
            held = lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"waiting for another process that is downloading MNIST into {raw} (it holds {lock.lock_file})")
            held = lock.acquire()
        with held:
            if find_files(root)[0] is not None:  # the process we waited for has downloaded them
                return
            new = [path for path in download_paths(root) if not path.exists()]  # listed holding the lock
            try:
                import torchvision  # only to download

                print(f"downloading MNIST into {raw}{found}")
                with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints a line per mirror tried
                    torchvision.datasets.MNIST(root, train=train, download=True)
            except BaseException:  # Ctrl-C too: no half-downloaded file is left to be read as MNIST
                _remove(new)  # still holding the lock, so no waiting process reads a file as it goes
                raise
    except (RuntimeError, OSError) as e:
        # torchvision lists every mirror it tried; its last line holds the last mirror's reason.
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not download MNIST into {raw} ({reason}); if you have the four IDX files (plain or .gz), "
            f"pass --data-dir with the folder that holds them, or copy them into {raw}; else check the network"
        ) from None


def load_split(data_dir: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one MNIST file pair from any layout under data_dir, downloading the files with torchvision first if no
    layout holds all four and download is allowed. Returns uint8 images and int64 labels. The files are read here
    rather than by torchvision's parser, which costs importing torchvision (about 1 s) on every run and reads
    only its own layout."""
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    if root.exists() and not root.is_dir():
        raise UserError(f"data dir {root} is a file, not a folder; pass --data-dir with a folder")
    files, partial = find_files(root)
    if files is None:
        found = f" ({'; '.join(partial)})" if partial else ""
        if not download:
            raise UserError(
                f"MNIST is not in {raw} or {root}{found}; drop --no-download to fetch it, "
                f"or put the four IDX files (plain or .gz) in one of them"
            )
        download_files(root, train, found)
        files, _ = find_files(root)
    images_name, labels_name = RAW_FILES["train" if train else "test"]
    images = read_idx(files[images_name], IDX_IMAGES_MAGIC)
    labels = read_idx(files[labels_name], IDX_LABELS_MAGIC)
    if len(labels) != len(images):
        raise UserError(
            f"{files[labels_name]} has {len(labels)} labels for {len(images)} images; "
            f"the MNIST files do not belong together"
        )
    if labels.size and labels.max() > 9:
        raise UserError(f"{files[labels_name]} has labels outside 0-9; it is not MNIST")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def load_splits(data_dir: str, val_size: int, split_seed: int, download: bool = True) -> dict[str, MNISTData]:
    """The train, val and test splits. Val is `val_size` images drawn from the training file with `split_seed`."""
    images, labels = load_split(data_dir, train=True, download=download)
    if val_size >= len(labels):
        raise UserError(f"val_size {val_size} leaves no training images: the training file has {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    # Sorting each side keeps the stored order, so a split is the same set in the same order for the same seed.
    val_index, train_index = order[:val_size].sort().values, order[val_size:].sort().values
    test_images, test_labels = load_split(data_dir, train=False, download=download)
    return {
        "train": MNISTData(images[train_index], labels[train_index]),
        "val": MNISTData(images[val_index], labels[val_index]),
        "test": MNISTData(test_images, test_labels),
    }
