"""Run folders: every training run writes into a folder of its own under out_dir, and only it does.

    runs/20261130-142301-cnn/     best.pt, last.pt, metrics.json, curves.png, TensorBoard events
    runs/20261130-150944-fcnn/    ...

A fresh run makes a new folder, named by its start time and model (or by --run-name), so it
never touches another run's files. While a run trains it holds an operating-system lock on its
folder, so a second process cannot write there; the lock goes away with the process, even
after kill -9. "The latest run" is the one that saved a checkpoint last:

    from rundir import latest_checkpoint
    latest_checkpoint()                  # Path('runs/20261130-150944-fcnn/best.pt')
"""

import contextlib
import os
import shlex
import socket
import time
from pathlib import Path

import filelock

from config import UserError

RUN_FILES = ("best.pt", "last.pt", "metrics.json")  # a folder holding any of these belongs to a run
LOCK, OWNER, JOB = ".lock", ".owner", ".torchrun-job"


def atomic_write(path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any moment leaves either the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then renamed
    over `path`; a rename within one file system is atomic. A failed write (a full disk, say) raises
    UserError and leaves the old file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not save {path}: {e.strerror or e}; the previous file is unchanged") from None
        raise
    try:  # make the rename itself durable; not every platform can open a folder
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _root(out_dir) -> Path:
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"out dir {root} is a file, not a folder; pass --out-dir with a folder")
    return root


def flag(option: str, value) -> str:
    """`--option value` for a command printed to be pasted, quoted for the shell; `--option=-x` when the value
    begins with -, which argparse would otherwise take for an option of its own."""
    quoted = shlex.quote(str(value))
    return f"{option}={quoted}" if quoted.startswith("-") else f"{option} {quoted}"


def new_run_dir(out_dir, run_name: str, model: str) -> Path:
    """Create the folder of a fresh run and return it. Never hands out a folder that holds another run's files."""
    root = _root(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if run_name:
            path = root / run_name
            if path.exists() and not path.is_dir():
                raise UserError(
                    f"run name {run_name} names a file, {path}, not a run folder; pass another --run-name "
                    f"(or none), or move the file"
                )
            path.mkdir(exist_ok=True)
            if any((path / name).exists() for name in RUN_FILES):
                raise UserError(
                    f"run {path} already exists; continue it with {flag('--run-name', run_name)} --resume, "
                    f"or start a new one with another --run-name (or none)"
                )
            return path
        # mkdir without exist_ok is atomic: two runs started in the same second get -2, -3, ...
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1, 1000):
            path = root / (f"{stamp}-{model}" if i == 1 else f"{stamp}-{model}-{i}")
            with contextlib.suppress(FileExistsError):
                path.mkdir()
                return path
    except OSError as e:
        raise UserError(
            f"cannot write to out dir {root} ({e.strerror}); pass --out-dir with a writable folder"
        ) from None
    raise UserError(f"could not find a free run name in {root} for {stamp}-{model}")


def latest_run(out_dir="runs", needs: str = "best.pt") -> Path:
    """The run folder in `out_dir` whose `needs` file (best.pt or last.pt) was saved last."""
    saved = list(_root(out_dir).glob(f"*/{needs}"))
    if not saved:
        raise UserError(f"no run in {out_dir}/ has a {needs} yet; train one with `python train.py`")
    return max(saved, key=lambda p: p.stat().st_mtime).parent


def latest_checkpoint(out_dir="runs", name: str = "best.pt") -> Path:
    """The path of the latest run's best.pt (or last.pt): what a notebook or evaluate.py usually wants."""
    return latest_run(out_dir, name) / name


def find_checkpoint(given=None, out_dir="runs") -> Path:
    """The checkpoint a command-line tool uses: the file given; the best.pt of a run folder or of a run name in
    out_dir; or, given nothing, the latest run's best.pt. Say which with describe_checkpoint once it is loaded."""
    if not given:
        return latest_checkpoint(out_dir)
    path = Path(given)
    if not path.exists() and len(path.parts) == 1 and path.suffix != ".pt":  # a run's name, such as exp1
        path = _root(out_dir) / path
        if not path.is_dir():
            raise UserError(
                f"no run named {given} in {out_dir}/ and no file {given}; pass a run name (ls {out_dir}/ lists "
                f"them), a run folder or a .pt file"
            )
    if path.is_dir():
        if not (path / "best.pt").is_file():
            last = " (it has a last.pt: pass that file, or --resume the run)" if (path / "last.pt").is_file() else ""
            raise UserError(f"no best.pt in {path}{last}; pass a run folder that has one, or a .pt file")
        return path / "best.pt"
    return path


def describe_checkpoint(path, ckpt: dict) -> str:
    """One line on which checkpoint a tool uses: its file, run, model and test accuracy (or why it has none)."""
    path = Path(path)
    test_acc, history = ckpt.get("test_acc"), ckpt.get("history") or [{}]
    if test_acc is not None:
        quality = f"test accuracy {test_acc:.2%}"
    else:  # a last.pt, or the best.pt of a run that has not finished
        val = history[-1].get("val_acc")
        quality = f"not tested (epoch {ckpt.get('epoch', '?')}" + (f", val accuracy {val:.2%})" if val else ")")
    return f"using {path}: run {path.resolve().parent.name}, model {ckpt.get('model_name', '?')}, {quality}"


def find_run(out_dir, run_name: str) -> Path:
    """The run to resume: the one named, or else the latest that saved a last.pt."""
    if not run_name:
        return latest_run(out_dir, "last.pt")
    path = _root(out_dir) / run_name
    if not (path / "last.pt").is_file():
        owner = writer_of(path)
        if owner:  # a run still before its first save: that is the true story, not "nothing to resume"
            raise UserError(
                f"run {path} is being written by {owner} and has no last.pt yet; wait for it to end, or start a new run"
            )
        raise UserError(
            f"nothing to resume: no {path / 'last.pt'}; check --run-name and --out-dir "
            f"(ls {out_dir}/ lists the runs), or run without --resume to start a new one"
        )
    return path


def remove_if_unused(run_dir: Path) -> bool:
    """Delete a fresh run's folder if the run saved nothing in it (it failed at once, say); say whether it did.
    Call it holding the lock."""
    if run_dir.is_dir() and not any((run_dir / name).exists() for name in RUN_FILES):
        with contextlib.suppress(OSError):  # Windows keeps a held lock file; a folder with a user's file stays
            for path in [*run_dir.glob("events.out.tfevents.*"), run_dir / JOB, run_dir / OWNER, run_dir / LOCK]:
                path.unlink(missing_ok=True)
            run_dir.rmdir()
            return True
    return False


def mark_job(run_dir: Path, job_id: str) -> None:
    """Note torchrun's job id in the run folder, so that the job's restarts find it (nothing without torchrun)."""
    if job_id:
        atomic_write(run_dir / JOB, job_id.encode())


def job_run(out_dir, job_id: str) -> Path | None:
    """The latest run folder in out_dir that torchrun's job `job_id` wrote, or None."""
    mine = [marker.parent for marker in _root(out_dir).glob(f"*/{JOB}") if _read(marker) == job_id]
    return max(mine, key=lambda p: (p / JOB).stat().st_mtime, default=None)


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold the run folder's lock while the block runs; fail with one line if another process holds it.

    filelock takes an flock on Unix (LockFileEx on Windows), which the operating system drops when
    the process dies, so a run killed with kill -9 never blocks the next one. The owner's PID is in a
    file beside the lock: the lock file itself may be truncated by whoever tries to take it.
    """
    lock = filelock.FileLock(run_dir / LOCK, blocking=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        owner = _read(run_dir / OWNER) or "another process"
        raise UserError(f"run {run_dir} is being written by {owner}; wait for it to end, or start a new run") from None
    except OSError as e:
        raise UserError(
            f"cannot write to run folder {run_dir} ({e.strerror}); pass --out-dir with a writable folder"
        ) from None
    try:
        try:
            (run_dir / OWNER).write_text(f"train.py with PID {os.getpid()} on {socket.gethostname()}\n")
        except OSError as e:
            raise UserError(
                f"cannot write to run folder {run_dir} ({e.strerror}); pass --out-dir with a writable folder"
            ) from None
        yield run_dir
    finally:
        lock.release()


def writer_of(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (its .owner line), or None when no process does. Creates no file."""
    if not (run_dir / LOCK).is_file():
        return None
    lock = filelock.FileLock(run_dir / LOCK, blocking=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return _read(run_dir / OWNER) or "another process"
    except OSError:
        return None
    lock.release()
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
