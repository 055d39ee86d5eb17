"""MNIST as tensors: torchvision's MNIST downloads the files, we keep each split as one tensor.

The reference post's `mnistData` keeps a Python list of PIL images and converts one
image per `__getitem__`. Here the same Dataset interface sits on one uint8 tensor per
split, so training slices whole batches out of memory with no per-sample work.
"""
import contextlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from config import UserError

# Mean and std of the 60,000 training pixels after scaling to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The four files torchvision's MNIST downloads into <data_dir>/MNIST/raw/, by split.
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (..., 28, 28) -> normalised float (..., 1, 28, 28), as the models expect."""
    return (images.unsqueeze(-3).float() - MNIST_MEAN * 255) / (MNIST_STD * 255)


class MNISTData(Dataset):
    """One MNIST split: `ds[i]` is (float tensor 1x28x28, int label), normalised like training."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images = images  # (N, 28, 28) uint8
        self.labels = labels  # (N,) int64
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = normalize(self.images[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def to(self, device) -> "MNISTData":
        return MNISTData(self.images.to(device), self.labels.to(device), self.transform)

    def batches(self, batch_size: int, order: torch.Tensor, start: int = 0, rank: int = 0, world: int = 1):
        """Yield normalised (images, labels) batches in `order` (a permutation of the indices), from batch `start` on.

        With world > 1 processes, each batch of `batch_size` is cut in `world` parts and this yields part
        `rank`: all processes together see the same batches as one process would."""
        for first in range(start * batch_size, len(self), batch_size):
            index = order[first:first + batch_size].tensor_split(world)[rank]
            yield normalize(self.images[index]), self.labels[index]


def epoch_order(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The shuffled order of epoch `epoch`. A pure function of (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


def _check_idx(path: Path, magic: int, count: int | None = None) -> int:
    """Check one IDX file's header against its size; return its item count. Names the file when it is wrong."""
    ndim = magic & 0xFF
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != magic:
        raise UserError(f"{path} is not an MNIST IDX file (wrong magic number); delete it and download again")
    dims = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        raise UserError(f"{path} is truncated or corrupt ({size} bytes, header says {expected}); delete it and download again")
    if ndim == 3 and dims[1:] != [28, 28]:
        raise UserError(f"{path} holds {dims[1]}x{dims[2]} images, not 28x28 MNIST digits")
    if count is not None and dims[0] != count:
        raise UserError(f"{path} has {dims[0]} labels for {count} images; the MNIST files do not belong together")
    return dims[0]


def read_idx(path: Path, header_bytes: int, shape: tuple) -> torch.Tensor:
    """The bytes after an IDX header as a uint8 tensor (the header was checked by _check_idx)."""
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8, offset=header_bytes).reshape(shape))


def load_split(data_dir: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one MNIST file pair, downloading the files with torchvision first if allowed. Returns uint8 images
    and int64 labels. The files are read here rather than by torchvision's parser, which is the same three lines
    of numpy but costs importing torchvision (about 1 s) on every run."""
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    if root.exists() and not root.is_dir():
        raise UserError(f"data dir {root} is a file, not a folder; pass --data-dir with a folder")
    if not all((raw / name).is_file() for names in RAW_FILES.values() for name in names):
        if not download:
            raise UserError(f"MNIST is not in {raw}; drop --no-download to fetch it, or put the four IDX files there")
        import torchvision  # only to download

        print(f"downloading MNIST into {raw}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints a line per mirror tried
                torchvision.datasets.MNIST(root, train=train, download=True)
        except (RuntimeError, OSError) as e:
            # torchvision lists every mirror it tried; its last line holds the last mirror's reason.
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"could not download MNIST into {raw} ({reason}); check the network, or copy the four IDX files there") from None
    images_file, labels_file = RAW_FILES["train" if train else "test"]
    n = _check_idx(raw / images_file, IDX_IMAGES_MAGIC)
    _check_idx(raw / labels_file, IDX_LABELS_MAGIC, count=n)
    images, labels = read_idx(raw / images_file, 16, (n, 28, 28)), read_idx(raw / labels_file, 8, (n,)).long()
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise UserError(f"{raw / labels_file} has labels outside 0-9; it is not MNIST")
    return images, labels


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
