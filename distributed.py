"""Several processes under torchrun, and one process without it, through the same calls.

    python train.py                                                  # one process: every helper is a no-op
    torchrun --standalone --nproc-per-node 2 train.py                # DistributedDataParallel, one voice

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for each process it starts; without them this is
the one process of a world of size 1, and nothing here communicates. Rank 0 is the one voice: it
prints, writes files and decides what the others learn through `from_main`. Every collective has
the process group's timeout, so a lost process ends the others with an error, not a hang.
"""

import contextlib
import datetime
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from config import UserError


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """How many processes torchrun started on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


# Steps between two stop-flag agreements: 1 for one process, which needs no collective to agree with itself.
STOP_CHECK_EVERY = 1 if world_size() == 1 else 10


def is_main() -> bool:
    return rank() == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


# The most restarts that any process of the group was told, once the group is up (see restarts()).
_group_restarts = None


def restarts() -> int:
    """How often torchrun has started this job's process group again after a worker failed (--max-restarts).

    torchrun counts on each machine, and a machine whose own workers were well restarts them with a count of 0
    when a worker on another machine failed; inside the group it is the most that any process of it was told."""
    if _group_restarts is not None:
        return _group_restarts
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


# The torchrun agents of this process group, once the group is up (see job_id()).
_group_agents = None


def agent() -> str:
    """The torchrun agent that started this process (its parent), named so that no other process is ever named
    the same: its host, its PID and its start time (in clock ticks since boot, from /proc). A PID alone is reused;
    with its start time it is not. Without /proc (macOS) the start time is "?", and the PID and host remain."""
    parent = os.getppid()
    try:  # /proc/PID/stat: "PID (command) state ..."; the command may hold spaces, so count from its ")"
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{parent}:{started}"


def job_id() -> str:
    """This torchrun launch, as one line for torchrun's job id and one for each machine's agent ('' without torchrun).

    A restart of the group (--max-restarts) keeps the id and the agents, so it finds the run it was writing. A new
    launch that reuses the id (a fixed --rdzv-id, as in PyTorch's multinode tutorial) has agents of its own, so it
    never takes over an earlier launch's run: torchrun gives its workers no id of the launch itself. Without
    --standalone, --rdzv-id defaults to "none" for every job: that names no job, so such a job never adopts a
    folder either."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id in ("", "none"):
        return ""
    return "\n".join([run_id, *(_group_agents or [agent()])])


def print0(*args, **kwargs) -> None:
    """print, on rank 0 alone."""
    if is_main():
        print(*args, **kwargs)


def report_error(line: str, mine: bool = False) -> None:
    """Hand an error line to torchrun, whose failure report then shows it as the process's "traceback" instead of
    a link to its docs. torchrun names a file for each worker (TORCHELASTIC_ERROR_FILE) and reads it in the format
    of torch.distributed.elastic's ErrorHandler; nothing happens without torchrun.

    A line that every process meets alike (a UserError) is handed in by each machine's first process alone, rank 0
    on its machine. torchrun's "Root Cause" is the failure with the earliest time, which is an error file's time
    when there is one, in whole seconds: had every process handed the line in, a rank that met it a second before
    rank 0 (rank 0 starts slower on a busy machine) would be named, though torchrun stopped it (SIGTERM). Without
    its file, a stopped rank's failure is timed when torchrun sees it, after rank 0 wrote and ended, and torchrun
    names the lower rank of two at the same second. A line of this process's own (`mine`: it lost its peers) is
    handed in by every process that says it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and (mine or local_rank() == 0):
        with contextlib.suppress(OSError), open(path, "w") as f:  # the line is printed anyway: this is a courtesy
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


# How long a rank other than 0 waits for torchrun to stop it after an error; past it, the rank ends anyway. Rank 0
# meets the same error within as long as a busy machine takes to start it (40 s seen to import torch).
OUTLIVE_SECONDS = 60


def let_rank_0_say_it() -> None:
    """On a rank other than 0, but on rank 0's machine, after an error: wait until torchrun stops this process.

    Only rank 0 prints a UserError, which every rank meets alike (from the same flags, or raised on all by
    from_main, node_first, agree_on_error and train.py's loss checks); one that rank 0 meets alone (saving, the
    test) ends the others' collectives, and they say they lost it. A rank that ended first made torchrun stop
    rank 0 with SIGTERM, and on a busy machine that came before rank 0 had printed (1 run in 10 beside three
    busy-looping processes). The torchrun of another machine does not stop rank 0, so its ranks end at once."""
    if world_size() > 1 and rank() != 0 and rank() == local_rank():
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches every process; rank 0 says what to do
            time.sleep(OUTLIVE_SECONDS)


def group_backend() -> str:
    """The process group's backend for each device type: gloo for the CPU, and torch's default for this machine's
    accelerator when it has one (nccl for CUDA, xccl for XPU, ...), as in "cpu:gloo,cuda:nccl".

    One group serves both, so it is right for whichever device the run trains on, which --resume may take
    from the saved run after the group exists. An accelerator's backend connects at its first collective."""
    backends = {"cpu": "gloo"}
    found = torch.accelerator.current_accelerator(check_available=True)
    default = dist.Backend.default_device_backend_map.get(found.type) if found is not None else None
    if default not in (None, "gloo"):  # gloo cannot move an accelerator's tensors (MPS maps to it)
        backends[found.type] = default
    return ",".join(f"{device}:{backend}" for device, backend in backends.items())


@contextlib.contextmanager
def process_group(timeout_seconds: int):
    """Join torchrun's process group for the block (group_backend()); nothing without torchrun."""
    if world_size() == 1:
        yield
        return
    global _group_restarts, _group_agents
    timeout = datetime.timedelta(seconds=timeout_seconds)
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    machines = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    if shared_store and machines > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise UserError(
            f"torchrun with --max-restarts on {machines} machines needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            f"torchrun's environment on every machine: without it a restart reuses the old rendezvous store, "
            f"where the machines' processes cannot find each other (pytorch/pytorch#135712)"
        )
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if shared_store:
        # The workers share the agent's key-value store, which outlives a restart of the group; without a prefix
        # per restart, a restarted rank can read the address of a dead one and fail to connect (seen with torch
        # 2.14 and gloo; pytorch/pytorch#135712 describes the same for NCCL). On one machine the count agrees.
        store = dist.PrefixStore(f"mnist-train/restart-{restarts()}", store)
    dist.init_process_group(group_backend(), store=store, rank=rank(), world_size=world_size(), timeout=timeout)
    try:
        count = torch.tensor(restarts())
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        _group_restarts = int(count)
        agents = [None] * world_size()
        dist.all_gather_object(agents, agent())  # each machine's agent, for job_id(): rank 0 may change machines
        _group_agents = sorted(set(agents))
        yield
        # Leave together. Ranks other than 0 finish first (rank 0 alone runs the test), and one that tore its
        # group down while rank 0 still worked sometimes aborted in gloo's C++ ("terminate called without an
        # active exception"), which torchrun takes for a failed job.
        dist.barrier()
    finally:
        _group_restarts = _group_agents = None
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DistributedDataParallel, which averages the gradients of all ranks in backward."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device.index])


def sum_all(*values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over all ranks (one all-reduce for all of them)."""
    if world_size() == 1:
        return list(values)
    flat = torch.stack([v.detach().double().reshape(()) for v in values])
    dist.all_reduce(flat)
    return list(flat.unbind())


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any: how ranks agree to stop at the same step."""
    if world_size() == 1:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def agree_on_error(message: str | None) -> None:
    """Raise UserError on every rank if any rank had one, with the first rank's message."""
    if world_size() == 1:
        if message:
            raise UserError(message)
        return
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)
    failed = [m for m in messages if m]
    if failed:
        raise UserError(failed[0])


def from_main(fn):
    """fn() run on rank 0 alone, its result sent to every rank; a UserError on rank 0 is raised on all."""
    if world_size() == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box = [(True, fn())]
        except UserError as e:
            box = [(False, str(e))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value


def node_first(fn):
    """fn() on each machine's local rank 0 first, then on its other ranks: the first downloads, the rest read.

    Concurrent downloads into one folder corrupt the files. A UserError on any rank is raised on all."""
    result = None
    for first_turn in (True, False):
        message = None
        if (local_rank() == 0) == first_turn:
            try:
                result = fn()
            except UserError as e:
                message = str(e)
        agree_on_error(message)
    return result


def lost_peer(error: BaseException) -> bool:
    """Whether an error says that another process of the group died or stopped answering."""
    if world_size() == 1:
        return False
    # gloo reports a vanished peer as a plain RuntimeError ("Connection reset by peer"), so the text decides.
    return isinstance(error, dist.DistError) or any(word in str(error) for word in ("gloo", "NCCL", "Connection"))


def shard(n: int) -> slice:
    """This rank's contiguous share of n items; the shares of all ranks cover each item once."""
    per, extra = divmod(n, world_size())
    start = rank() * per + min(rank(), extra)
    return slice(start, start + per + (rank() < extra))
