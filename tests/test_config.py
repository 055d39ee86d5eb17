from dataclasses import fields, replace

import pytest

import config
from config import Config, UserError, parse_args
from conftest import fast_args, one_line_error, run_cli
from data import epoch_order, load_splits


def test_no_flags_gives_the_defaults():
    """With no flags, parse_args returns exactly the defaults written in config.py."""
    assert parse_args([]) == Config()


def test_overrides_parse_to_the_field_types():
    """Flags become values of the field's own type; an int is accepted for a float field."""
    cfg = parse_args(
        [
            "--epochs",
            "3",
            "--lr=1",
            "--data-dir",
            "../shared/data",
            "--model",
            "fcnn",
            "--no-nesterov",
            "--momentum",
            "0",
            "--seed",
            "7",
        ]
    )
    assert (cfg.epochs, cfg.lr, cfg.data_dir, cfg.model, cfg.nesterov, cfg.seed) == (
        3,
        1.0,
        "../shared/data",
        "fcnn",
        False,
        7,
    )
    assert type(cfg.epochs) is int and type(cfg.lr) is float and type(cfg.nesterov) is bool


def other_value(f, default):
    """A valid value for the field that is not its default."""
    if f.name == "device":  # checked against torch's device types, not a fixed list of choices
        return "cpu"
    if f.metadata["choices"]:
        return next(choice for choice in f.metadata["choices"] if choice != default)
    if f.type is str:
        return f"other{default}"
    return default / 2 or 0.5 if f.type is float else default + 1


def test_every_field_has_a_flag_that_sets_it():
    """Each field's dashed flag (a bool's --x and --no-x) sets that field, and only it, to a value other than its
    default, so the CLI and config.py never drift apart."""
    defaults = Config()
    for f in fields(Config):
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        if f.type is bool:
            cases = [([flag], True), ([f"--no-{flag[2:]}"], False)]
        else:
            cases = [([flag, str(other_value(f, default))], other_value(f, default))]
        for argv, value in cases:
            assert parse_args(argv) == replace(defaults, **{f.name: value}), argv
        assert {value for _, value in cases} != {default}, f"{f.name}: no flag moved it off its default"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lrr", "0.1"], "unknown option --lrr (did you mean --lr?); valid options: --data-dir"),
        (["--epochs", "three"], "--epochs takes an integer, got 'three'"),
        (["--epochs", "2.5"], "--epochs takes an integer, got '2.5'"),
        (["--lr", "-0.1"], "lr (--lr) must be > 0, got -0.1"),
        (["--lr", "nan"], "lr (--lr) must be a finite number"),
        (["--model", "resnet"], "model (--model) must be one of cnn, fcnn; got 'resnet'"),
        (["--device", "tpu"], "device (--device) must be auto or a device type torch knows"),
        (["--val-size", "60000"], "val_size (--val-size) must be <= 59999"),
        (["--momentum", "0"], "nesterov needs momentum > 0"),
        (["--epochs"], "argument --epochs: expected one argument"),
        (["extra"], "unexpected argument 'extra'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(argv, message):
    """A bad flag or value raises UserError whose one-line message says what is wrong."""
    with pytest.raises(UserError) as err:
        parse_args(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_edits_to_config_py_are_checked_too():
    """A wrongly typed default (as if edited in config.py) is caught before any work starts."""
    with pytest.raises(UserError, match=r"batch_size \(--batch-size\) must be an integer, got '64'"):
        config.check(Config(batch_size="64"))
    with pytest.raises(UserError, match="must be an integer, got True"):
        config.check(Config(epochs=True))


def test_help_lists_every_flag(capsys):
    """--help prints usage with every field's flag and exits 0."""
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in text for f in fields(Config))


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    """An unknown flag on the real command line exits 2 with a single 'error:' line."""
    result = run_cli("train.py", "--epoch", "3", "--out-dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith("error: unknown option --epoch (did you mean --epochs?)")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["a/b", "../../escape", "..", ".", "/tmp/abs", "a\\b", "  ", " exp1", "exp1 "])
def test_run_name_that_is_not_one_folder_name_is_refused(name):
    """--run-name takes one folder name: a path, . or .., or spaces at either end are refused in one line."""
    with pytest.raises(UserError, match=r"^run_name \(--run-name\) must be one folder name, such as exp1: .*got "):
        parse_args(["--run-name", name])


@pytest.mark.parametrize("name", ["exp1", "lr 0.05", "exp.1", "..x", "20261130-142301-cnn"])
def test_run_name_that_is_one_folder_name_is_taken(name):
    """Any single folder name is a run name, dots and inner spaces included; empty means a new timestamped one."""
    assert parse_args(["--run-name", name]).run_name == name
    assert parse_args(["--run-name", ""]).run_name == ""


def test_escaping_run_name_writes_nothing(mnist_dir, tmp_path, run_main):
    """train.py --run-name ../escape fails in one line before any work, and makes no folder inside or outside out_dir."""
    out = tmp_path / "deep" / "runs"
    message = one_line_error(run_main(*fast_args(mnist_dir, out / "x"), "--run-name", "../escape"))
    assert "must be one folder name" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, high", [("--seed", config.SEED_HIGH), ("--split-seed", 2**64 - 1)])
def test_seeds_past_what_torch_takes_are_refused(flag, high, mnist_dir, tmp_path, run_main):
    """The largest seed is taken, and the batch order (up to epoch 100,002) or the split it seeds is drawn; one more
    is refused, and train.py refuses a larger one in one line before any work, where torch's generator used to
    overflow in a traceback."""
    name = flag[2:].replace("-", "_")
    assert getattr(parse_args([flag, str(high)]), name) == high
    if flag == "--seed":
        assert len(epoch_order(10, high, 100_002, "cpu")) == 10
    else:
        assert len(load_splits(mnist_dir, 100, high, download=False)["val"]) == 100
    with pytest.raises(UserError, match=rf"^{name} \({flag}\) must be <= {high}, got {high + 1}$"):
        parse_args([flag, str(high + 1)])
    message = one_line_error(run_main(*fast_args(mnist_dir, tmp_path / "run"), flag, 2 * high))
    assert message == f"error: {name} ({flag}) must be <= {high}, got {2 * high}"
    assert not tmp_path.joinpath("run").exists()
