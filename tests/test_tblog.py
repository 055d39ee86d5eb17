"""The TensorBoard side channel's two writers: the real one and NoLog, which does nothing with the same methods."""

import inspect

import pytest

import tblog
from config import Config


def public_methods(cls) -> dict:
    return {name: inspect.signature(f) for name, f in vars(cls).items() if callable(f) and not name.startswith("_")}


def test_nolog_has_exactly_the_writers_methods():
    """NoLog stands in for TensorBoard with the same methods and signatures, so the loop needs no `if` for logging."""
    assert public_methods(tblog.NoLog) == public_methods(tblog.TensorBoard) != {}


def test_nolog_refuses_a_method_it_does_not_have():
    """A misspelt logging call fails when logging is off too, instead of being swallowed."""
    with pytest.raises(AttributeError):
        tblog.NoLog().stpe(0.5, 0.1, 3)


def test_logging_off_or_off_the_main_rank_gives_nolog(tmp_path):
    """--no-tensorboard, and every torchrun rank but 0, get a NoLog and create no event file."""
    assert isinstance(tblog.open_writer(Config(tensorboard=False), tmp_path, None, main=True), tblog.NoLog)
    assert isinstance(tblog.open_writer(Config(tensorboard=True), tmp_path, None, main=False), tblog.NoLog)
    assert list(tmp_path.iterdir()) == []
