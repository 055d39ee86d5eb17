"""The one checkpoint loader: a malformed checkpoint, whatever part of it is wrong, is one line from every tool."""

import pickle

import pytest
import torch
from PIL import Image

import predict
from conftest import call_main, copy_run, one_line_error, run_cli, run_flags
from model import CNN, FCNN, load_checkpoint


def weights(model=CNN):
    torch.manual_seed(0)
    return model().state_dict()


def with_weights(**changes):
    """Make a changer of a CNN checkpoint dict that sets its weights' entries: None deletes one."""

    def change(ckpt):
        state = dict(ckpt["model"])
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value
        return {**ckpt, "model": state}

    return change


# (how the dict is damaged, what the one line must say); {path} is the file.
MALFORMED = [
    (dict(model_name=5), "{path} holds a model_name of 5, not one of this project's: cnn, fcnn"),
    (dict(model_name=["cnn"]), "{path} holds a model_name of ['cnn'], not one of"),
    (dict(model_name="vgg"), "{path} holds a model_name of 'vgg', not one of"),
    (dict(model_args=None), "{path} holds model_args of None, where a dict of cnn's arguments belongs"),
    (dict(model_args=["hidden", 8]), "{path} holds model_args of ['hidden', 8], where a dict"),
    (dict(model_args={"depth": 3}), "{path} holds model_args {{'depth': 3}} that do not build a cnn model"),
    (dict(model_args={1: 3}), "{path} holds model_args {{1: 3}} that do not build a cnn model"),
    (dict(model_name="fcnn", model_args={"hidden": "8"}), "that do not build a fcnn model"),
    (dict(model_name="fcnn", model_args={"hidden": -1}), "that do not build a fcnn model"),
    (dict(model_name="fcnn", model_args={"hidden": 10**30}), "that do not build a fcnn model"),
    # Refused by the shapes, before a 3 TB weight is allocated.
    (
        dict(model_name="fcnn", model_args={"hidden": 10**12}),
        "do not fit a fcnn model with {{'hidden': 1000000000000}}",
    ),
    (dict(model=None), "{path} holds its weights as a NoneType, where a state_dict (a dict) belongs"),
    (dict(model=list(weights().values())), "{path} holds its weights as a list, where a state_dict"),
    (with_weights(**{"fc.bias": "0"}), "{path} holds a str as the weight 'fc.bias', where a tensor belongs"),
    (with_weights(**{"fc.bias": None}), "the weights in {path} do not fit a cnn model (no fc.bias)"),
    (
        with_weights(**{"fc.extra": torch.zeros(1)}),
        "the weights in {path} do not fit a cnn model (unexpected 'fc.extra')",
    ),
    (with_weights(**{"fc.bias": torch.zeros(11)}), "(fc.bias is (11,) torch.float32, not (10,) torch.float32)"),
    (with_weights(**{"fc.bias": torch.zeros(10, dtype=torch.complex64)}), "fc.bias is (10,) torch.complex64, not"),
    (lambda ckpt: {**ckpt, "model": dict(enumerate(ckpt["model"].values()))}, "(no conv1.weight; no conv1.bias;"),
    (dict(model_name="fcnn", model_args={"hidden": 8}), "do not fit a fcnn model with {{'hidden': 8}} (no fc1.weight;"),
]


@pytest.mark.parametrize("damage, message", MALFORMED)
def test_a_malformed_checkpoint_is_one_line(tmp_path, capsys, damage, message):
    """A checkpoint dict with a model_name, model_args or weights of the wrong type, value or shape is refused by the
    one loader in one line naming the file and what is wrong, before anything is allocated (here through predict.py);
    the same dict undamaged loads."""
    good = {"model": weights(), "model_name": "cnn", "model_args": {}, "epoch": 1}
    (tmp_path / "good.pt").write_bytes(b"")
    torch.save(good, tmp_path / "good.pt")
    load_checkpoint(tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    torch.save(damage(good) if callable(damage) else {**good, **damage}, path)
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    result = call_main(capsys, predict.main, [tmp_path / "digit.png", "--checkpoint", path])
    assert message.format(path=path) in one_line_error(result)


def test_fcnn_weights_of_another_width_name_the_width(tmp_path):
    """FCNN weights of width 16 saved as width 8 are refused with the shapes that differ, not loaded half-way."""
    path = tmp_path / "fcnn.pt"
    torch.save({"model": weights(lambda: FCNN(16)), "model_name": "fcnn", "model_args": {"hidden": 8}}, path)
    with pytest.raises(predict.UserError, match=r"fc1\.weight is \(16, 784\) torch\.float32, not \(8, 784\)"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "protocol, message",
    [(2, "refused to load {path}: it was written with pickle.dump"), (5, "{path} is not a readable checkpoint")],
)
def test_a_plain_pickle_is_one_line_without_torch_warnings(tmp_path, protocol, message):
    """A checkpoint dict written with pickle.dump instead of torch.save is refused in one line, with none of torch's
    warnings about its pickle protocol before it (a real process, since pytest captures warnings in this one)."""
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"model": weights(), "model_name": "cnn", "model_args": {}}, protocol=protocol))
    result = run_cli("predict.py", tmp_path / "digit.png", "--checkpoint", path, timeout=60)
    assert message.format(path=path) in one_line_error(result)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """A checkpoint whose tensors were saved on a CUDA device (by torch.save by hand, say) loads on a machine without
    one, on the CPU."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as a GPU machine tags them
    torch.save({"model": weights(), "model_name": "cnn", "model_args": {}}, tmp_path / "gpu.pt")
    monkeypatch.undo()
    model, ckpt = load_checkpoint(tmp_path / "gpu.pt")
    assert all(t.device.type == "cpu" for t in [*model.state_dict().values(), *ckpt["model"].values()])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights().values()))


# Every key of a last.pt beyond the model's three.
RUN_KEYS = ["config", "optimizer", "scheduler", "scaler", "epoch", "epoch_progress", "history", "best_epoch"]
RUN_KEYS += ["best_val_acc", "normalization", "torch_version", "world_size"]


@pytest.mark.parametrize("key", RUN_KEYS)
def test_resuming_a_last_pt_without_one_key_trains_on_or_names_the_key(trained_run, tmp_path, run_main, key):
    """--resume of a last.pt that lacks any one key either trains on, or refuses in one line naming that key; never a
    traceback."""
    run = copy_run(trained_run, tmp_path)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert sorted(ckpt.keys() - {"model", "model_name", "model_args"}) == sorted(RUN_KEYS)
    del ckpt[key]
    torch.save(ckpt, run / "last.pt")
    result = run_main(*run_flags(run), "--resume", "--epochs", 3, "--no-tensorboard")
    if result.returncode != 0:
        assert f"{run / 'last.pt'} holds a model but no {key}: it is not a whole checkpoint" in one_line_error(result)
