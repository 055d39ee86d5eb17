"""Shared fixtures: tiny synthetic MNIST written in the real IDX format, so the real reading code runs."""

import contextlib
import functools
import gzip
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Collection
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import RAW_FILES

# The tests that train in this process use one thread, so that the suite also passes on a busy machine: beside
# one busy-looping process per core, torch's default threads wait for each other at every step, and a 2-thread
# step took 11x as long as a 1-thread one (idle, 1 thread is 0.73x as fast; `benchmarks/speed.py --busy`).
# The scripts they start as processes do too (OMP_NUM_THREADS), which also keeps train.py's busy-CPU note, which
# depends on the machine's load, out of their output.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# Real MNIST for the real-data checks: $MNIST_DATA_DIR, else the shared copy beside the repo.
REAL_DATA = Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data"))
REAL_DATA_MISSING = not all(
    (REAL_DATA / "MNIST" / "raw" / name).is_file() for names in RAW_FILES.values() for name in names
)


def needs_real_data(test):
    """Mark a test that reads real MNIST: skipped without it, and slow (left out of the inner loop below)."""
    skip = pytest.mark.skipif(REAL_DATA_MISSING, reason=f"real MNIST not found in {REAL_DATA} (set MNIST_DATA_DIR)")
    return pytest.mark.slow(skip(test))


N_TRAIN, N_TEST = 600, 200

# The inner loop, `python -m pytest -q -n auto -m "not slow"`, runs every module's own tests in about a minute and leaves out
# the tests that need what takes long to start or to run: real MNIST (they train on it), a browser, torchrun's
# processes, network namespaces. CI runs them all. Whole files here; single tests elsewhere carry the mark.
SLOW_FILES = {
    "test_demo_browser.py",
    "test_web_browser.py",
    "test_inside_browser.py",
    "test_distributed.py",
    "test_hosts.py",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES or "real_run" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


def missing_tool(what: str, enable: str) -> NoReturn:
    """For a test that needs a tool which is not here (Chromium, nginx, onnxruntime-web, root for network
    namespaces): an error in CI (CI must run every test: .ci/run installs them all), elsewhere a skip whose reason
    says what is missing and the command that enables it. Also at module level, for a module that needs it all."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run this test, but {what}: {enable}", pytrace=False)
    pytest.skip(f"{what}: {enable}", allow_module_level=True)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file: magic (0, 0, type 0x08, ndim), big-endian dims, then the bytes; gzipped
    when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class k is a bright 8x8 square at one of ten places, on faint noise.

    One label in twenty is replaced by a random one, so a trained model still makes a few mistakes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for image, k in zip(images, labels):
        row, col = 2 + 9 * (k // 4), 2 + 6 * (k % 4)
        image[row : row + 8, col : col + 8] = rng.integers(180, 256, size=(8, 8))
    noisy = rng.random(n) < 0.05
    labels[noisy] = rng.integers(0, 10, size=noisy.sum())
    return images, labels.astype(np.uint8)


def write_mnist(
    root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, folder: str = "MNIST/raw", gz: Collection[str] = ()
) -> Path:
    """Write the four MNIST files under root/folder/ (the files named in gz gzipped, with .gz added) and return root."""
    raw = root / folder
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        for name, array in zip(RAW_FILES[split], synthetic_digits(n, seed)):
            write_idx(raw / (f"{name}.gz" if name in gz else name), array)
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
    return [
        "--data-dir",
        str(data_dir),
        *run_flags(run_dir),
        "--no-download",
        "--val-size",
        "100",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def run_cli(script: str, *args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh Python process, as a user would."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def one_line_error(result, exit_code=2) -> str:
    """The process failed with `exit_code` and said why on exactly one stderr line, without a traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def copy_run(run_dir: Path, out_dir: Path, names: Collection[str] | None = None) -> Path:
    """A copy of a run folder inside out_dir, for a test that changes or runs into it: a shared fixture's run stays
    as it is. With `names`, only those files are copied."""
    copy = Path(out_dir) / Path(run_dir).name
    if names is None:
        return Path(shutil.copytree(run_dir, copy))
    copy.mkdir(parents=True)
    for name in names:
        shutil.copy2(Path(run_dir) / name, copy / name)
    return copy


# --- processes that a test starts, reads while they run, and stops ----------------------------

# tests/train_paused.py is train.py that pauses after optimiser step $PAUSE_AFTER_STEP, prints PAUSED, and
# waits for a signal: a test that interrupts a run then knows it is still going, and at which step.
PAUSED_TRAIN = ROOT / "tests" / "train_paused.py"
PAUSED = "paused after step"


def paused_at(step: int) -> dict:
    """The environment that makes tests/train_paused.py pause after optimiser step `step`, training with one thread
    as this process does, so that a run it leaves can resume here to bitwise the weights of an unbroken run here."""
    return {**os.environ, "PAUSE_AFTER_STEP": str(step), "OMP_NUM_THREADS": "1"}


def start(command, **popen) -> subprocess.Popen:
    """Start a process whose stdout the test reads line by line while it runs. Its stderr goes to a temporary
    file rather than a pipe: a pipe that nobody reads blocks the writer once it holds 64 KiB."""
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [str(part) for part in command], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, **popen
    )
    proc.stderr_file = stderr
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    """All that a process from start() has written to stderr so far."""
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()


def finish(proc: subprocess.Popen, timeout=120) -> subprocess.CompletedProcess:
    """Wait for a process from start() to end and return its output; after `timeout` seconds kill it and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, stderr_of(proc))


def children(proc: subprocess.Popen) -> list[int]:
    """The PIDs of the processes that proc started (torchrun's workers), read from /proc."""
    listing = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    return [int(pid) for pid in listing.read_text().split()] if listing.exists() else []


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a process and the processes it started (torchrun and its workers), and reap it."""
    if proc.poll() is None:  # once reaped, its PID may already belong to another process
        for pid in [*children(proc), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.communicate()


def wait_for_line(proc: subprocess.Popen, start_of_line: str) -> list[str]:
    """Read a running process's stdout up to the first line that begins with `start_of_line`; return the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start_of_line):
            return lines
    raise AssertionError(f"the process ended before printing {start_of_line!r}:\n{''.join(lines)}{stderr_of(proc)}")


def interrupt_when_paused(proc: subprocess.Popen, interrupt, timeout=120) -> subprocess.CompletedProcess:
    """Wait until a run of train_paused.py has paused, call interrupt(), and return how the run ended; on any
    failure (or a hang past `timeout`) kill the run and its workers, so no test leaves processes behind."""
    try:
        wait_for_line(proc, PAUSED)
        interrupt()
        return finish(proc, timeout)
    finally:
        if proc.returncode is None:
            kill_all(proc)


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
    """A run folder holding two epochs of the default recipe on the real MNIST (skips without it).

    Two epochs are safe since the recipe clips the gradient norm: 14 two-epoch runs of benchmarks/recipe_sweep.py
    (1 and 2 threads, torchrun) gave 99.08% to 99.23%, where the unclipped recipe left some at 11%."""
    if REAL_DATA_MISSING:
        pytest.skip(f"real MNIST not found in {REAL_DATA} (set MNIST_DATA_DIR)")
    import train

    run_dir = tmp_path_factory.mktemp("real") / "run"
    assert train.main(["--data-dir", str(REAL_DATA), *run_flags(run_dir), "--epochs", "2", "--no-download"]) == 0
    return run_dir


class FolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder it is given, without a log line per request, and counts the GET requests for each path."""

    def __init__(self, *args, counts, **kwargs):
        self.counts = counts
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.counts[self.path] = self.counts.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args):  # one line per request on stderr would bury a failure's output
        pass

    def handle(self):
        with contextlib.suppress(ConnectionResetError):  # torchvision closes its redirect probe without reading
            super().handle()


def serve_folder(folder, counts: dict | None = None):
    """Serve `folder` as `python -m http.server -d folder` does, on a free port of 127.0.0.1, from a thread, and
    yield its URL; count the GET requests for each path in `counts`."""
    return serve_with(functools.partial(FolderHandler, directory=str(folder), counts={} if counts is None else counts))


@contextlib.contextmanager
def serve_with(handler):
    """Serve HTTP with `handler`, a request handler class or partial, on a free port of 127.0.0.1, from a thread;
    yield its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def use_mirror(monkeypatch, url: str) -> None:
    """Point torchvision's MNIST download at the mirror `url` for this test, with no checksums for its files."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [url])
    resources = [(name, None) for name, _ in torchvision.datasets.MNIST.resources]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", resources)
