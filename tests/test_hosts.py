"""Several hosts, not only several processes: machines that share a file system downloading MNIST into one folder."""

import sys
import time

import data
from conftest import ROOT, finish, kill_all, start

# A machine's first torchrun process, as node_first leaves it the download, with torchvision's MNIST faked: it
# writes the four files slowly, in pieces, and notes each download. Both machines start to read at the same moment.
FIRST_ON_ITS_MACHINE = """
import sys, time, types
from pathlib import Path
sys.path.insert(0, {root!r})
source, downloads, data_dir, ready, go = map(Path, sys.argv[1:])


def slow_mnist(root, train, download):
    with open(downloads, "a") as log:
        log.write("downloaded\\n")
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in sorted(p.name for p in source.iterdir()):
        content = (source / name).read_bytes()
        with open(raw / name, "wb") as f:
            for piece in range(4):
                f.write(content[piece * len(content) // 4 : (piece + 1) * len(content) // 4])
                f.flush()
                time.sleep(0.1)


sys.modules["torchvision"] = types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=slow_mnist))
import data, distributed

ready.touch()
while not go.exists():
    time.sleep(0.01)
splits = distributed.node_first(lambda: data.load_splits(data_dir, val_size=100, split_seed=0))
print(sum(int(split.images.sum()) + int(split.labels.sum()) for split in splits.values()))
"""


def test_machines_sharing_a_file_system_download_mnist_once(mnist_dir, tmp_path):
    """Two processes that are each the first on their machine, with one data folder between them: one downloads,
    the other waits for it, and both read whole files."""
    script, downloads, data_dir, go = (
        tmp_path / "first.py",
        tmp_path / "downloads",
        tmp_path / "shared",
        tmp_path / "go",
    )
    script.write_text(FIRST_ON_ITS_MACHINE.format(root=str(ROOT)))
    machines = [
        start([sys.executable, script, mnist_dir / "MNIST" / "raw", downloads, data_dir, tmp_path / f"ready{n}", go])
        for n in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{n}").exists() for n in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        results = [finish(proc, timeout=60) for proc in machines]
    finally:
        for proc in machines:
            if proc.returncode is None:
                kill_all(proc)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert downloads.read_text().splitlines() == ["downloaded"]
    splits = data.load_splits(mnist_dir, val_size=100, split_seed=0, download=False)
    expected = sum(int(split.images.sum()) + int(split.labels.sum()) for split in splits.values())
    assert [int(r.stdout.split()[-1]) for r in results] == [expected, expected]
