"""Shared fixtures: tiny synthetic MNIST written in the real IDX format, so the real reading code runs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import RAW_FILES  # noqa: E402

# Real MNIST for the real-data checks: $MNIST_DATA_DIR, else the shared copy beside the repo.
REAL_DATA = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data"))
needs_real_data = pytest.mark.skipif(
    not all((REAL_DATA / "MNIST" / "raw" / name).is_file() for names in RAW_FILES.values() for name in names),
    reason=f"real MNIST not found in {REAL_DATA} (set MNIST_DATA_DIR)",
)

N_TRAIN, N_TEST = 600, 200


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic (0, 0, type 0x08, ndim), big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class k is a bright 8x8 square at one of ten places, on faint noise.

    One label in twenty is replaced by a random one, so a trained model still makes a few mistakes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for image, k in zip(images, labels):
        row, col = 2 + 9 * (k // 4), 2 + 6 * (k % 4)
        image[row:row + 8, col:col + 8] = rng.integers(180, 256, size=(8, 8))
    noisy = rng.random(n) < 0.05
    labels[noisy] = rng.integers(0, 10, size=noisy.sum())
    return images, labels.astype(np.uint8)


def write_mnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write the four MNIST files under root/MNIST/raw/ and return root."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / RAW_FILES[split][0], images)
        write_idx(raw / RAW_FILES[split][1], labels)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A data dir holding synthetic MNIST; read-only by convention, copy it to damage it."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


def run_flags(run_dir) -> list[str]:
    """The flags that name the run folder run_dir: its out dir and its run name."""
    return ["--out-dir", str(Path(run_dir).parent), "--run-name", Path(run_dir).name]


def fast_args(data_dir, run_dir, *extra) -> list[str]:
    """Command-line flags for a run into the folder run_dir, on the synthetic data, that takes about a second."""
    return ["--data-dir", str(data_dir), *run_flags(run_dir), "--no-download", "--val-size", "100",
            "--epochs", "1", "--batch-size", "50", "--device", "cpu", *map(str, extra)]


def run_cli(script: str, *args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh Python process, as a user would."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


def call_main(capsys, main, args) -> subprocess.CompletedProcess:
    """Call a script's main() in this process (no 5 s torch import) and return what a subprocess run would."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([main.__module__, *args], code, out, err)


@pytest.fixture
def run_main(capsys):
    """train.py's main, run in this process."""
    import train
    return lambda *args: call_main(capsys, train.main, args)


@pytest.fixture(scope="session")
def trained_run(mnist_dir, tmp_path_factory) -> Path:
    """An out dir holding a finished two-epoch run on the synthetic data."""
    import train

    out = tmp_path_factory.mktemp("run")
    assert train.main(fast_args(mnist_dir, out, "--epochs", 2)) == 0
    return out


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """A run folder holding three epochs of the default recipe on the real MNIST (skips without it).

    Three, not two: with augmentation and the default warm-up, two epochs are too short to settle (seed 1: 97.2%)."""
    if not all((REAL_DATA / "MNIST" / "raw" / name).is_file() for names in RAW_FILES.values() for name in names):
        pytest.skip(f"real MNIST not found in {REAL_DATA} (set MNIST_DATA_DIR)")
    import train

    run_dir = tmp_path_factory.mktemp("real") / "run"
    assert train.main(["--data-dir", str(REAL_DATA), *run_flags(run_dir), "--epochs", "3", "--no-download"]) == 0
    return run_dir
