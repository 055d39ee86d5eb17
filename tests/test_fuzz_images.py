"""Damaged files of every format digits.FORMATS reads: each is a digit or one ValueError line, never another exception.

A seeded mutation fuzzer (bytes overwritten, bits flipped, runs deleted or inserted, the file cut short) over a small
drawing saved in each format, most with an EXIF block that turns it upright. Files it found that escaped as
SyntaxError, TypeError, struct.error and the like, or made Pillow print a warning, are kept in tests/damaged/ and
checked on every run, through prepare_digit, predict.py and the demo.
"""

import io
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import demo
from conftest import run_cli
from digits import FORMATS, prepare_digit
from model import load_checkpoint

with warnings.catch_warnings():  # starlette 1.x suggests httpx2 for its test client; httpx works the same
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

# Pillow warns about much of what it reads in this process; that is not the question (predict.py's output is)
pytestmark = pytest.mark.filterwarnings("ignore:::PIL")

DAMAGED = Path(__file__).parent / "damaged"  # files the fuzzer found, named <original>-<seed>-<case>
SEED = 31
CASES = 400  # mutated files per format; all six formats take about 3 s, and found failures before the fix
SECONDS = 20  # a busy machine stops here instead (each file is checked on its own, so a shorter run only checks less)


def drawing(mode: str) -> Image.Image:
    """A small dark 7 on light paper: a file of a few hundred bytes whose every part a mutation may hit."""
    image = Image.new("RGB", (40, 32), (230, 225, 215))
    ImageDraw.Draw(image).line([(8, 6), (32, 6), (14, 28)], fill=(30, 30, 70), width=4)
    return image.convert(mode)


def originals() -> dict[str, bytes]:
    """The drawing in each format, in the modes that format's decoders meet most; EXIF (rotated a quarter turn)
    where the format stores it, so that reading the orientation is fuzzed too."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise
    exif[0x010F] = "fuzz"  # Make: a string tag, so the block has an offset to follow
    files = {}
    for name in FORMATS:
        for mode in ("RGB", "L", "P") if name in ("PNG", "GIF", "BMP", "TIFF") else ("RGB",):
            options = {"exif": exif.tobytes()} if name in ("PNG", "JPEG", "WEBP", "TIFF") else {}
            buffer = io.BytesIO()
            drawing(mode).save(buffer, format=name, **options)
            files[f"{name}-{mode}"] = buffer.getvalue()
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits, mostly in the first 200 bytes where headers, chunk lengths and EXIF live."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(min(len(out), 200)) if rng.random() < 0.7 else rng.randrange(len(out))
        edit = rng.random()
        if edit < 0.4:
            out[at] = rng.randrange(256)
        elif edit < 0.6:
            out[at] ^= 1 << rng.randrange(8)
        elif edit < 0.75:
            del out[at : at + rng.randint(1, 16)]
        elif edit < 0.9:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # a number that sizes something: the largest it can be
            out[at : at + 2] = b"\xff\xff"
    if rng.random() < 0.1:
        out = out[: rng.randrange(1, len(out))]
    return bytes(out)


def outcome(data: bytes) -> str | None:
    """None when prepare_digit keeps its contract on data (a digit, or a ValueError of one line); else what escaped."""
    try:
        digit = prepare_digit(data)
    except ValueError as e:
        return None if str(e) and "\n" not in str(e) else f"ValueError of {str(e).count(chr(10)) + 1} lines"
    except Exception as e:  # what the test is for: anything else escapes the one-line contract
        return f"{type(e).__name__}: {e}"
    return None if digit.shape == (28, 28) and digit.dtype == np.uint8 else f"a digit of shape {digit.shape}"


def fuzz(seed: int, cases: int, seconds: float) -> tuple[dict[str, tuple[bytes, str]], int]:
    """Mutate each original `cases` times (or until `seconds` have passed); return the files that broke the contract,
    by name (<original>-<seed>-<case>) with what escaped, and how many files were checked."""
    rng, files = random.Random(seed), originals()
    escaped, checked, deadline = {}, 0, time.monotonic() + seconds
    for case in range(cases):
        for name, data in files.items():
            mutated = mutate(data, rng)
            failure = outcome(mutated)
            if failure:
                escaped[f"{name}-{seed}-{case}"] = (mutated, failure)
            checked += 1
        if time.monotonic() > deadline:
            break
    return escaped, checked


def test_mutated_files_of_every_format_give_a_digit_or_one_valueerror_line():
    """CASES mutated files per original (seeded, so a failure reproduces) each give a 28x28 digit or one ValueError
    line: no decoder's SyntaxError, TypeError, struct.error, IndexError or the like gets through prepare_digit."""
    escaped, checked = fuzz(SEED, CASES, SECONDS)
    assert checked >= len(originals()), "not even one round ran"
    failures = {name: failure for name, (_, failure) in escaped.items()}
    assert not escaped, f"{len(escaped)} of {checked} files escaped: {failures}"


def damaged_files() -> list[Path]:
    return sorted(DAMAGED.iterdir())


@pytest.mark.parametrize("path", damaged_files(), ids=lambda path: path.name)
def test_files_the_fuzzer_found_are_one_valueerror_line(path):
    """Each damaged file that once escaped as another exception gives a digit or one ValueError line."""
    assert outcome(path.read_bytes()) is None


def readable(path: Path) -> bool:
    """Whether prepare_digit makes a digit of the file (a damaged EXIF block may leave the picture readable)."""
    try:
        prepare_digit(path)
    except ValueError:
        return False
    return True


def test_predict_py_says_one_line_for_each_damaged_file_and_classifies_the_others(trained_run, tmp_path):
    """`python predict.py good.png <every damaged file> good.png` classifies the good files and the readable damaged
    ones, and gives each unreadable one a single error line in its place: no traceback, no decoder's warning; exit 1."""
    good = tmp_path / "good.png"
    drawing("RGB").resize((200, 160)).save(good)
    paths = [good, *damaged_files(), good]
    result = run_cli("predict.py", *paths, "--checkpoint", trained_run / "best.pt")
    assert result.returncode == 1, result.stderr
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [str(p) for p in paths if readable(p)]
    using, *errors = result.stderr.splitlines()
    assert using.startswith("using "), result.stderr  # the line naming the checkpoint
    unreadable = [p for p in paths if not readable(p)]
    assert len(errors) == len(unreadable) >= 1, result.stderr
    for line, path in zip(errors, unreadable, strict=True):
        assert line.startswith(f"error: {path}: "), result.stderr


def test_the_demo_answers_415_for_a_damaged_file_and_logs_no_traceback(trained_run, capsys):
    """POST /predict with each file the fuzzer found gets a 415 and one error line (or, if it is readable, its digit),
    and nothing in the server's log."""
    with TestClient(demo.create_app(load_checkpoint(trained_run / "best.pt")[0])) as client:
        for path in damaged_files():
            capsys.readouterr()
            response = client.post("/predict", files={"image": (path.name, path.read_bytes())})
            if readable(path):
                assert response.status_code == 200, (path.name, response.text)
            else:
                assert response.status_code == 415 and list(response.json()) == ["error"], (path.name, response.text)
                assert "\n" not in response.json()["error"]
            assert capsys.readouterr().err == "", path.name
