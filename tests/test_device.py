"""The device and the process group's backend, from torch.accelerator (issue 17; issue 19, bugs 2 and 3).

Only the CPU is real here: each accelerator is faked by monkeypatching torch.accelerator, so these tests check
the choice, not that a GPU trains."""

import inspect

import pytest
import torch
import torch.distributed as dist

import distributed
from config import UserError, parse_args
from devices import amp_dtype, pick_device


@pytest.fixture
def machine(monkeypatch):
    """Make torch.accelerator report an accelerator of the given type and count (None: no accelerator), and
    record the device index set; returns a function (kind, count=1, available=True) that sets the machine up.

    available=False is a torch built for the accelerator on a machine without one (a CUDA wheel, no driver):
    as in torch, current_accelerator names it unless asked with check_available=True."""
    chosen = []

    def fake(kind, count=1, available=True):
        found = torch.device(kind) if kind else None

        def current_accelerator(check_available=False):
            return found if available or not check_available else None

        monkeypatch.setattr(torch.accelerator, "current_accelerator", current_accelerator)
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: count if kind and available else 0)
        monkeypatch.setattr(torch.accelerator, "set_device_index", chosen.append)
        return chosen

    return fake


def under_torchrun(monkeypatch, processes: int, local_rank: int) -> None:
    """Set the environment torchrun gives one of `processes` workers on this machine."""
    for name, value in (
        ("WORLD_SIZE", processes),
        ("LOCAL_WORLD_SIZE", processes),
        ("RANK", local_rank),
        ("LOCAL_RANK", local_rank),
    ):
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("kind, expected", [(None, "cpu"), ("cuda", "cuda"), ("mps", "mps"), ("xpu", "xpu")])
def test_auto_takes_the_accelerator_when_there_is_one(machine, kind, expected):
    """--device auto is torch.accelerator's device when it sees one, and the CPU otherwise."""
    machine(kind)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "kind, asked", [(None, "cuda"), (None, "mps"), ("cuda", "xpu"), ("mps", "cuda"), (None, "meta")]
)
def test_an_absent_device_is_one_line(machine, kind, asked):
    """Asking for a device type this machine does not have is refused in one line that names both and the way out."""
    machine(kind)
    with pytest.raises(UserError) as error:
        pick_device(asked)
    message = str(error.value)
    assert message.startswith(f"device {asked} was asked for, but this torch has no {asked} device")
    assert (f"its accelerator is {kind}" if kind else "it sees no accelerator") in message
    assert "--device cpu" in message and "\n" not in message


def test_under_torchrun_each_process_takes_the_accelerator_of_its_local_rank(machine, monkeypatch):
    """With as many accelerators as processes, process LOCAL_RANK gets device LOCAL_RANK and makes it current."""
    chosen = machine("cuda", count=2)
    under_torchrun(monkeypatch, processes=2, local_rank=1)
    assert pick_device("auto") == torch.device("cuda", 1)
    assert chosen == [1]


def test_more_processes_than_accelerators_is_one_line_naming_the_counts(machine, monkeypatch):
    """torchrun with 4 processes on a machine with 2 GPUs is refused in one line, before any device is set."""
    chosen = machine("cuda", count=2)
    under_torchrun(monkeypatch, processes=4, local_rank=0)
    with pytest.raises(
        UserError,
        match=r"^torchrun started 4 processes on this machine, but it has only 2 cuda "
        r"devices; pass --nproc-per-node 2, or --device cpu$",
    ):
        pick_device("auto")
    assert chosen == []
    assert pick_device("cpu") == torch.device("cpu")  # the CPU takes any number


def test_mps_under_torchrun(machine, monkeypatch):
    """Under torchrun, auto on a Mac takes the CPU (DDP has no MPS backend), and asking for mps is one line."""
    machine("mps")
    under_torchrun(monkeypatch, processes=2, local_rank=0)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="torchrun cannot train on Apple MPS"):
        pick_device("mps")


@pytest.mark.parametrize(
    "kind, backend",
    [(None, "cpu:gloo"), ("cuda", "cpu:gloo,cuda:nccl"), ("xpu", "cpu:gloo,xpu:xccl"), ("mps", "cpu:gloo")],
)
def test_the_group_backend_is_torchs_default_for_the_accelerator_beside_gloo(machine, kind, backend):
    """The process group serves CPU tensors with gloo and the accelerator's with torch's default backend for it."""
    machine(kind)
    assert distributed.group_backend() == backend
    if kind:  # torch's map, not ours; gloo (MPS's, absent from torch 2.7's map) cannot move an accelerator's tensors
        default = dist.Backend.default_device_backend_map.get(kind, "gloo")
        assert backend == ("cpu:gloo" if default == "gloo" else f"cpu:gloo,{kind}:{default}")


@pytest.mark.parametrize("kind", ["cuda", "xpu", "mps"])
def test_an_accelerator_torch_was_built_for_but_cannot_use_is_no_accelerator(machine, kind):
    """A torch built for an accelerator on a machine without it (a CUDA wheel, no driver) trains on the CPU with a
    gloo-only group, and asking for the accelerator is one line."""
    machine(kind, available=False)
    assert pick_device("auto") == torch.device("cpu")
    assert distributed.group_backend() == "cpu:gloo"
    with pytest.raises(UserError, match="it sees no accelerator"):
        pick_device(kind)


def test_a_group_started_on_a_gpu_machine_serves_a_cpu_run(machine, monkeypatch):
    """On a machine with a GPU, the group torchrun's processes start with also serves CPU tensors (gloo), so a run
    that --resume puts on the CPU after the group exists (the saved run's --device cpu) can still communicate."""
    machine("cuda")
    under_torchrun(monkeypatch, processes=2, local_rank=0)
    started = []
    monkeypatch.setattr(dist, "rendezvous", lambda url, timeout: iter([(object(), 0, 2)]))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: started.append(backend))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op: None)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    with distributed.process_group(timeout_seconds=10):
        pass
    [backend] = started
    assert "cpu:gloo" in backend.split(",") and "cuda:nccl" in backend.split(",")


@pytest.mark.parametrize("name", ["cpu", "cuda", "mps", "xpu", "hpu"])
def test_any_device_type_torch_knows_is_a_valid_setting(name):
    """--device takes every device type torch knows (whether the machine has it is checked when the run starts)."""
    assert parse_args(["--device", name]).device == name


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "tpu",
            "device (--device) must be auto or a device type torch knows, such as cpu, cuda, mps or xpu; got 'tpu'",
        ),
        ("cuda:1", "device (--device) takes a device type without an index, such as 'cuda'"),
        ("", "must be auto or a device type torch knows"),
    ],
)
def test_an_unknown_device_type_is_one_line(name, message):
    """A device that is not a type torch knows, or that names an index, is refused in one line when the flags are read."""
    with pytest.raises(UserError) as error:
        parse_args(["--device", name])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "gpu, native, expected",
    [("A100 (Ampere)", True, torch.bfloat16), ("T4 (Turing, bfloat16 only emulated)", False, torch.float16)],
)
def test_mixed_precision_is_bfloat16_only_where_the_gpu_computes_in_it(machine, monkeypatch, gpu, native, expected):
    """--amp on a CUDA GPU that only emulates bfloat16 takes float16 with loss scaling; on one that has it, bfloat16."""
    machine("cuda")
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters  # the fake's API

    def is_bf16_supported(including_emulation=True):  # as torch answers: an emulating GPU says yes by default
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype(torch.device("cuda")) == expected, gpu
    assert amp_dtype(torch.device("cpu")) == torch.bfloat16  # CPU autocast (--amp refuses the CPU before it)
