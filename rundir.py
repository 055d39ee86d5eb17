"""Run folders: every training run writes into a folder of its own under out_dir, and only it does.

    runs/20261130-142301-cnn/     best.pt, last.pt, metrics.json, curves.png, status.json, TensorBoard events
    runs/20261130-150944-fcnn/    ...

A fresh run makes a new folder, named by its start time and model (or by --run-name), so it
never touches another run's files. While a run trains it holds an operating-system lock on its
folder, so a second process cannot write there; the lock goes away with the process, even
after kill -9. Its status.json says how it stands (running, finished, stopped, died, failed).
"The latest run" is the one that saved a checkpoint last, passing over runs that died:

    from rundir import latest_checkpoint
    latest_checkpoint()                  # Path('runs/20261130-150944-fcnn/best.pt')
"""

import contextlib
import json
import os
import re
import shlex
import socket
import time
from pathlib import Path

import filelock

from config import UserError

RUN_FILES = ("best.pt", "last.pt", "metrics.json")  # a folder holding any of these belongs to a run
LOCK, OWNER, JOB = ".lock", ".owner", ".torchrun-job"
STATUS = "status.json"  # how the run ended, or that it is running: {"status": ..., "why": ...}

# The out dir folders (out_dir and its parents) that new_run_dir made in this process: a run that saved nothing
# removes them again if they are empty, and no folder that was there before it.
_made_here: set[Path] = set()


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
        missing = [folder for folder in (root, *root.parents) if not folder.exists()]
        root.mkdir(parents=True, exist_ok=True)
        _made_here.update(folder.absolute() for folder in missing)
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
    """The run folder in `out_dir` whose `needs` file (best.pt or last.pt) was saved last. For a best.pt, a run that
    died is passed over: its best.pt is from a network that stopped learning, never what a tool should pick unasked."""
    saved = sorted(_root(out_dir).glob(f"*/{needs}"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not saved:
        raise UserError(f"no run in {out_dir}/ has a {needs} yet; train one with `python train.py`")
    if needs == "last.pt":  # --resume: the run that saved last, whatever became of it; it says which it continues
        return saved[0].parent
    usable = [path.parent for path in saved if read_status(path.parent).get("status") != "died"]
    if not usable:
        raise UserError(
            f"every run in {out_dir}/ with a {needs} died, the latest {saved[0].parent} "
            f"({read_status(saved[0].parent).get('why', 'no reason kept')}); train a new one with "
            f"`python train.py`, or pass a run's name to use it anyway"
        )
    return usable[0]


def latest_checkpoint(out_dir="runs", name: str = "best.pt") -> Path:
    """The path of the latest usable run's best.pt (or last.pt): what a notebook or evaluate.py usually wants."""
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
    status = read_status(path.parent)
    died = f", which died ({status.get('why', 'no reason kept')})" if status.get("status") == "died" else ""
    return f"using {path}: run {path.resolve().parent.name}{died}, model {ckpt.get('model_name', '?')}, {quality}"


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
    Call it holding the lock.

    Only what this process wrote goes: its event files (named with its host and PID), its marker and owner files,
    and the lock it holds. The folder goes if that empties it, and then the out dir if new_run_dir made it here."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in RUN_FILES):
        return False
    mine = run_dir.glob(f"events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*")
    with contextlib.suppress(OSError):  # Windows keeps a held lock file; a folder with a user's file stays
        for path in [*mine, run_dir / STATUS, run_dir / JOB, run_dir / OWNER, run_dir / LOCK]:
            path.unlink(missing_ok=True)
        run_dir.rmdir()
        for folder in run_dir.absolute().parents:  # the out dir, and the folders above it that were made for it
            if folder not in _made_here:
                break
            folder.rmdir()
        return True
    return not run_dir.exists()


def write_status(run_dir: Path, status: str, why: str = "") -> None:
    """Record how the run stands: running, finished (trained and tested), stopped (Ctrl-C or SIGTERM: last.pt is
    saved, --resume continues it), died (its network stopped learning or its loss became NaN) or failed (an error
    that is not the network's, such as a full disk). One small file, replaced atomically."""
    atomic_write(run_dir / STATUS, json.dumps({"status": status, **({"why": why} if why else {})}).encode())


def read_status(run_dir: Path) -> dict:
    """The run's status.json as a dict; {} for a run from before statuses were kept, or none at all."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


@contextlib.contextmanager
def status_kept(run_dir: Path, died=()):
    """Keep the run's status for the block: running while it runs, then how it ended. An exception of the types in
    `died` means died; Ctrl-C, or an end without finished recorded (train.py records it after the test), means
    stopped; any other exception means failed. A kill -9 leaves running, with no process holding the lock."""
    write_status(run_dir, "running")
    try:
        yield
    except KeyboardInterrupt:
        _note_status(run_dir, "stopped")
        raise
    except died as e:
        _note_status(run_dir, "died", re.split(r"[:,] ", str(e), maxsplit=1)[0])  # "training is stuck at ..."
        raise
    except BaseException as e:
        _note_status(run_dir, "failed", str(e).strip().split("\n")[-1][:200] or type(e).__name__)
        raise
    if read_status(run_dir).get("status") == "running":
        write_status(run_dir, "stopped")


def _note_status(run_dir: Path, status: str, why: str = "") -> None:
    """write_status while an error is on its way out: the error matters more than the note (the disk may be full)."""
    with contextlib.suppress(UserError):
        write_status(run_dir, status, why)


def mark_job(run_dir: Path, job_id: str) -> None:
    """Note this torchrun launch (distributed.job_id()) in the run folder, so that its restarts find it (nothing
    without torchrun). Each claim writes it again, with the agents of that attempt."""
    if job_id:
        atomic_write(run_dir / JOB, job_id.encode())


def same_launch(marker: str, job_id: str) -> bool:
    """Whether a folder's marker names this launch: the same job id, and an agent in common. Every machine of a
    launch keeps its agent through the restarts, and a new launch has only new ones; a marker that names no agent
    (written before agents were named) proves nothing, so it never matches."""
    marked, this = marker.splitlines() or [""], job_id.splitlines() or [""]  # the job id, then one agent a line
    return marked[0] == this[0] and bool(set(marked[1:]) & set(this[1:]))


def job_run(out_dir, job_id: str) -> Path | None:
    """The latest run folder in out_dir that this torchrun launch (distributed.job_id()) wrote, or None."""
    mine = [marker.parent for marker in _root(out_dir).glob(f"*/{JOB}") if same_launch(_read(marker), job_id)]
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
