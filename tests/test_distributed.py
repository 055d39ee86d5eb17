"""torchrun and DistributedDataParallel: real torchrun processes on the synthetic data, on loopback, each with a
timeout so that a hang fails fast; the one-process runs they are compared with train in this process."""

import contextlib
import gzip
import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import (
    PAUSED_TRAIN,
    ROOT,
    children,
    copy_run,
    fast_args,
    finish,
    interrupt_when_paused,
    paused_at,
    run_flags,
    serve_folder,
    start,
    use_mirror,
)
from data import RAW_FILES
from model import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

TIMEOUT = 120
# 499 training images in batches of 50: the last batch of 49 splits 25/24, so the loss weighting is tested too.
UNEVEN = ["--val-size", 101]
# The runs that a test interrupts: 500 images in batches of 10, 50 steps an epoch, paused in the middle of epoch 2.
INTERRUPTED = ["--epochs", 3, "--batch-size", 10]
PAUSE_STEP = 75


def torchrun(*args, nproc=2, extra=(), script=ROOT / "train.py", **popen) -> subprocess.Popen:
    """Start `torchrun --standalone` (or with `extra` rendezvous flags) on the project's train.py."""
    launch = extra or ["--standalone"]
    return start(
        [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", nproc, script, *args], **popen
    )


def rows(stdout: str) -> list[list[str]]:
    """The epoch rows of the printed table, without the seconds column."""
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    return [row[:6] for row in table]


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")[0].state_dict()


def assert_close(a: dict, b: dict) -> None:
    """The same weights up to the order of float sums (DDP adds the ranks' gradients in another order)."""
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda detail, key=key: f"{key}: {detail}")


@pytest.fixture(scope="module")
def one_process(mnist_dir, tmp_path_factory):
    """A single-process run of one epoch, and its printed output: the trajectory the others must follow. It runs
    in this process, as `python train.py` would run it (no second torch import)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert train.main(fast_args(mnist_dir, run_dir, *UNEVEN)) == 0
    return run_dir, out.getvalue()


@pytest.fixture(scope="module")
def two_processes(mnist_dir, tmp_path_factory):
    """The same epoch under torchrun with 2 CPU processes, and what torchrun printed."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    result = finish(torchrun(*fast_args(mnist_dir, run_dir, *UNEVEN)))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def two_epochs(mnist_dir, one_process, tmp_path_factory):
    """The one-process run resumed for a second epoch, in this process: where a run resumed elsewhere must end."""
    run_dir = copy_run(one_process[0], tmp_path_factory.mktemp("reference"))
    assert train.main([*fast_args(mnist_dir, run_dir, *UNEVEN), "--epochs", "2", "--resume"]) == 0
    return run_dir


def test_two_processes_follow_the_one_process_trajectory(one_process, two_processes):
    """torchrun with 2 CPU processes ends one epoch with the 1-process weights and prints the same table, once."""
    (run_dir, single_out), (two_dir, result) = one_process, two_processes
    assert_close(weights(two_dir), weights(run_dir))
    assert rows(result.stdout) == rows(single_out) and len(rows(result.stdout)) == 1
    assert result.stdout.count("test: loss") == 1 and result.stdout.count("config:") == 1
    assert "device: cpu, 2 processes x 1 thread" in result.stdout  # conftest's OMP_NUM_THREADS=1, which torchrun keeps
    assert [p.name for p in two_dir.parent.iterdir()] == ["run"]
    assert len(event_writers(two_dir)) == 1  # rank 0 alone logs


def event_writers(run_dir: Path) -> set[int]:
    """The PIDs of the processes that wrote a run folder's event files, named events.out.tfevents.TIME.HOST.PID.N
    (the host name may hold dots itself)."""
    names = [path.name for path in run_dir.glob("events.out.tfevents.*")]
    assert names, f"no event files in {run_dir}"
    return {int(re.fullmatch(r"events\.out\.tfevents\.\d+\..+\.(\d+)\.\d+", name)[1]) for name in names}


def test_two_machines_meet_over_loopback(mnist_dir, tmp_path, one_process):
    """Two torchrun launches (--nnodes 2, c10d rendezvous on 127.0.0.1) train together like one process."""
    # The rendezvous store is this test's own, on a port that the system chose and that stays bound: a port
    # found free and let go could be taken by another process before torchrun binds it again.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # Both "machines" share this one's cores: a thread each, as torchrun gives 2 processes on one machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [
        torchrun(
            *fast_args(mnist_dir, tmp_path / "nodes", *UNEVEN),
            nproc=1,
            env=env,
            extra=[
                "--nnodes",
                "2",
                "--node-rank",
                node,
                "--local-addr",
                "127.0.0.1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{store.port}",
                "--rdzv-conf",
                "is_host=0",
                "--rdzv-id",
                "test-nodes",
            ],
        )
        for node in (0, 1)
    ]
    results = [finish(proc) for proc in launches]
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert_close(weights(tmp_path / "nodes"), weights(one_process[0]))
    assert sum(r.stdout.count("test: loss") for r in results) == 1
    assert rows("".join(r.stdout for r in results)) == rows(one_process[1])


def test_a_batch_size_the_world_does_not_divide_is_one_line(mnist_dir, tmp_path):
    """--batch-size 51 on 2 processes ends both with one error line, printed once, and leaves no run folder;
    torchrun's failure report names the same line as its root cause, where it would link to its docs."""
    result = finish(torchrun(*fast_args(mnist_dir, tmp_path / "odd", "--batch-size", 51)))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: batch_size 51 is the whole batch of all 2 processes and must split evenly among them; "
        "pass a --batch-size that 2 divides"
    ], result.stderr
    assert not (tmp_path / "odd").exists()
    root_cause = result.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert f"traceback : {errors[0]}\n" in root_cause and "To enable traceback" not in result.stderr


SLOW_RANK_0 = """
import os, sys, time
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "0":
    time.sleep(4)  # as on a busy machine: rank 1 reaches the error well before rank 0 does
import config, train
config.exit_script(train.main())
"""


def test_an_error_is_said_even_when_rank_0_reaches_it_last(tmp_path):
    """A bad flag under torchrun is said once, by rank 0, even when rank 1 has met it seconds earlier; torchrun's
    "Root Cause" names rank 0 and its line, not rank 1, which torchrun stopped."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0.format(root=str(ROOT)))
    result = finish(torchrun("--lrr", "0.1", script=script), timeout=90)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown option --lrr (did you mean --lr?)"), result.stderr
    root_cause = result.stderr.split("Root Cause (first observed failure):", 1)[1].split("=" * 20, 1)[0]
    assert re.search(r"\n\s*rank\s*: 0 \(local_rank: 0\)\n", root_cause), root_cause
    assert f"traceback : {errors[0]}\n" in root_cause


def test_a_data_error_ends_every_rank_with_one_line(tmp_path):
    """Missing data with --no-download fails on the first rank to look; every rank ends, with the error said once."""
    result = finish(torchrun(*fast_args(tmp_path / "empty", tmp_path / "runs" / "nodata")), timeout=60)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MNIST is not in" in errors[0]


USE_MIRROR = """
import sys
sys.path.insert(0, {root!r})
import torchvision
import config
torchvision.datasets.MNIST.mirrors = [{url!r}]  # the test's server on loopback; no checksums for its files
torchvision.datasets.MNIST.resources = [(name, None) for name, _ in torchvision.datasets.MNIST.resources]
import train
config.exit_script(train.main())
"""


def test_only_one_process_per_machine_downloads(mnist_dir, tmp_path, monkeypatch):
    """On a fresh machine 2 processes make exactly the requests that 1 process makes, and both train on the files."""
    served = tmp_path / "mirror"
    served.mkdir()
    for name in (n for names in RAW_FILES.values() for n in names):
        (served / f"{name}.gz").write_bytes(gzip.compress((mnist_dir / "MNIST" / "raw" / name).read_bytes()))
    counts = {1: {}, 2: {}}
    for nproc in (1, 2):
        args = fast_args(tmp_path / f"fresh{nproc}", tmp_path / "runs" / f"run{nproc}")
        args.remove("--no-download")
        with serve_folder(served, counts[nproc]) as url:
            if nproc == 1:  # in this process, with torchvision pointed at the mirror as USE_MIRROR points it
                use_mirror(monkeypatch, url)
                assert train.main(args) == 0
            else:
                script = tmp_path / "train_from_mirror.py"
                script.write_text(USE_MIRROR.format(root=str(ROOT), url=url))
                result = finish(torchrun(*args, script=script, nproc=nproc))
                assert result.returncode == 0, result.stderr
        assert (tmp_path / "runs" / f"run{nproc}" / "best.pt").is_file()
    # torchvision asks for each file more than once (it follows redirects with a GET first), hence the comparison.
    assert counts[2] == counts[1] and set(counts[1]) == {f"/{n}.gz" for names in RAW_FILES.values() for n in names}


def test_ctrl_c_stops_every_rank_at_one_step_and_the_run_resumes_on_one_process(mnist_dir, tmp_path):
    """SIGINT to torchrun's whole process group: rank 0 saves last.pt mid-epoch and says how to resume, once;
    the run then finishes on 1 process with each epoch once in its history."""
    proc = torchrun(
        *fast_args(mnist_dir, tmp_path / "run", *INTERRUPTED),
        script=PAUSED_TRAIN,
        env=paused_at(PAUSE_STEP),
        start_new_session=True,
    )
    result = interrupt_when_paused(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert result.stderr.count("To continue: python train.py") == 1
    assert "Traceback" not in "".join(line for line in result.stderr.splitlines(True) if line.startswith("[rank"))
    saved = load_checkpoint(tmp_path / "run" / "last.pt")[1]
    assert saved["world_size"] == 2 and saved["epoch"] == 1  # saved by the 2 processes, in epoch 2
    assert PAUSE_STEP - 50 <= saved["epoch_progress"]["step"] < 50 and 0 < saved["epoch_progress"]["seen"] < 500
    assert train.main([*run_flags(tmp_path / "run"), "--resume"]) == 0
    history = load_checkpoint(tmp_path / "run" / "last.pt")[1]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[0] == saved["history"][0]


def test_sigterm_to_torchrun_saves_and_stops_the_workers(mnist_dir, tmp_path):
    """SIGTERM to the torchrun agent alone (as SLURM or Kubernetes send it) reaches the workers, which save last.pt."""
    proc = torchrun(
        *fast_args(mnist_dir, tmp_path / "run", *INTERRUPTED), script=PAUSED_TRAIN, env=paused_at(PAUSE_STEP)
    )
    result = interrupt_when_paused(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert "SIGTERM: stopping after this step to save last.pt" in result.stderr
    assert result.stderr.count("To continue: python train.py") == 1
    saved = load_checkpoint(tmp_path / "run" / "last.pt")[1]
    assert saved["epoch"] == 1 and PAUSE_STEP - 50 <= saved["epoch_progress"]["step"] < 50


def test_sigterm_stops_a_single_process_run_like_ctrl_c(mnist_dir, tmp_path):
    """SIGTERM to a plain `python train.py` saves last.pt at the current step and exits 130 with the resume command."""
    proc = start(
        [sys.executable, PAUSED_TRAIN, *fast_args(mnist_dir, tmp_path / "run", *INTERRUPTED)], env=paused_at(PAUSE_STEP)
    )
    result = interrupt_when_paused(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert result.returncode == 130, result.stderr
    assert "To continue: python train.py" in result.stderr and "Traceback" not in result.stderr
    saved = load_checkpoint(tmp_path / "run" / "last.pt")[1]
    assert (saved["epoch"], saved["epoch_progress"]["step"]) == (1, PAUSE_STEP - 50)  # the step it was on


def test_a_killed_worker_is_restarted_and_the_run_finishes(mnist_dir, tmp_path):
    """kill -9 of one worker under --max-restarts 1: torchrun restarts the group, which continues from last.pt
    in the same run folder, and the run ends with each epoch once in its history."""
    if not Path("/proc").is_dir():
        pytest.skip("finding torchrun's workers needs /proc")
    proc = torchrun(
        *fast_args(mnist_dir, tmp_path / "runs" / "run", *INTERRUPTED),
        script=PAUSED_TRAIN,
        env=paused_at(PAUSE_STEP),
        extra=["--standalone", "--max-restarts", "1"],
    )
    # Epoch 1 is in last.pt when the run pauses; the restarted group does not pause.
    result = interrupt_when_paused(proc, lambda: os.kill(children(proc)[-1], signal.SIGKILL))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchrun restarted this job (restart 1): continuing" in result.stdout
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["run"]
    history = load_checkpoint(tmp_path / "runs" / "run" / "last.pt")[1]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]


@pytest.mark.parametrize("first", ["one_process", "two_processes"])
def test_a_run_resumes_under_another_world_size(mnist_dir, tmp_path, request, two_epochs, first):
    """A run saved under N processes resumes under M with the same global batch, and ends where 1 process would."""
    saved = copy_run(request.getfixturevalue(first)[0], tmp_path)
    args = [*fast_args(mnist_dir, saved, *UNEVEN), "--epochs", "2", "--resume"]
    if first == "one_process":  # saved by 1 process, resumed by 2
        result = finish(torchrun(*args))
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert train.main(args) == 0
    assert load_checkpoint(saved / "last.pt")[1]["world_size"] == (2 if first == "one_process" else 1)
    assert_close(weights(saved), weights(two_epochs))
