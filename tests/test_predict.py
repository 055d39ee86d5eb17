"""A user's own digits: prepare_digit makes photos and scans look like MNIST, and predict.py classifies them."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import predict as predict_cli
from conftest import ROOT, call_main
from data import load_split
from digits import NoDigit, load_image, prepare_digit, shrunk
from fake_photos import photo_set, photograph
from model import load_checkpoint, model_logits, predict


def drawn_seven(size=(300, 220), box=(150, 40, 230, 180), ink=30, paper=225, width=12) -> Image.Image:
    """A '7' in thick strokes, placed off-centre on a canvas, as a pen on paper would draw it."""
    image = Image.new("L", size, paper)
    left, top, right, bottom = box
    ImageDraw.Draw(image).line([(left, top), (right, top), (left + 20, bottom)], fill=ink, width=width)
    return image


def ink_box(digit: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(digit.max(axis=1) > 0), np.flatnonzero(digit.max(axis=0) > 0)
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(digit.shape)
    return (rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum()


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def test_ink_is_fitted_in_20x20_and_centred_by_mass():
    """An off-centre dark-on-light drawing becomes a 28x28 uint8 light-on-dark digit: ink fits 20x20, mass at the centre."""
    digit = prepare_digit(drawn_seven())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8 and digit.max() == 255
    assert max(ink_box(digit)) == 20 and min(ink_box(digit)) < 20  # aspect ratio kept
    assert np.allclose(centre_of_mass(digit.astype(float)), (14, 14), atol=1.0)
    assert digit[0].max() == digit[-1].max() == digit[:, 0].max() == digit[:, -1].max() == 0


def test_polarity_is_detected():
    """Light ink on a dark background and dark ink on light paper give the same digit."""
    dark_on_light = prepare_digit(drawn_seven(ink=30, paper=225))
    light_on_dark = prepare_digit(drawn_seven(ink=225, paper=30))
    assert similarity(dark_on_light, light_on_dark) > 0.98


def test_uneven_light_noise_colour_and_jpeg_are_removed():
    """A gradient of light, sensor noise, a colour tint and JPEG compression leave the digit as the clean drawing gives it."""
    clean = prepare_digit(drawn_seven())
    rng = np.random.default_rng(0)
    pixels = np.asarray(drawn_seven(), dtype=float)
    pixels *= np.linspace(0.55, 1.0, pixels.shape[1])[None, :]  # light from the right
    pixels += rng.normal(0, 10, pixels.shape)
    rgb = np.clip(pixels[..., None] * [1.0, 0.9, 0.75], 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=75)
    assert similarity(prepare_digit(buffer.getvalue()), clean) > 0.95


def test_an_mnist_digit_comes_back_almost_unchanged():
    """Input that already looks like MNIST (28x28, light on dark, fitted and centred) passes nearly as it is."""
    digit = prepare_digit(drawn_seven())
    again = prepare_digit(digit)
    assert similarity(again, digit) > 0.98
    assert np.abs(again.astype(int) - digit.astype(int)).mean() < 6


@pytest.mark.parametrize("picture", ["flat", "noise", "gradient"])
def test_an_image_without_ink_is_no_digit(picture):
    """A blank page, plain sensor noise or a gradient of light alone is reported as holding no digit."""
    rng = np.random.default_rng(1)
    pixels = np.full((200, 200), 200.0)
    if picture == "noise":
        pixels += rng.normal(0, 6, pixels.shape)
    if picture == "gradient":
        pixels *= np.linspace(0.6, 1.0, 200)[:, None]
    with pytest.raises(NoDigit, match="no digit found"):
        prepare_digit(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def wide(pixels: np.ndarray, mode: str) -> Image.Image:
    """An image of a wide greyscale mode (I;16, I or F) holding `pixels`, as a scanner's file would decode."""
    dtype = {"I;16": "<u2", "I": np.int32, "F": np.float32}[mode]
    return Image.frombytes(mode, pixels.shape[::-1], pixels.astype(dtype).tobytes())


@pytest.mark.parametrize("size", [(300, 220), (3000, 2200)])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_scan_reads_exactly_as_its_8_bit_version(size, fmt):
    """A 16-bit greyscale scan (PNG or TIFF, mode I;16) holding 257 times an 8-bit drawing gives exactly the digit
    of the 8-bit file, small or larger than the working size (PIL would clip it to white, or fail to shrink it)."""
    scale = size[0] / 300
    box = tuple(round(v * scale) for v in (150, 40, 230, 180))
    eight = np.asarray(drawn_seven(size=size, box=box, width=round(12 * scale)))
    scan = wide(eight.astype(np.uint32) * 257, "I;16")
    assert Image.open(io.BytesIO(encoded(scan, fmt))).mode in ("I;16", "I")  # I: a PNG in Pillow 10.1
    assert np.array_equal(prepare_digit(encoded(scan, fmt)), prepare_digit(encoded(Image.fromarray(eight), fmt)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_turns_the_photo_as_pillow_does(orientation):
    """A phone's JPEG with each of the 8 EXIF orientations is turned by load_image as ImageOps.exif_transpose turns it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    drawn_seven().convert("RGB").save(buffer, format="JPEG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    got = load_image(buffer.getvalue())
    assert got.size == expected.size and np.array_equal(np.asarray(got), np.asarray(expected))


def test_a_16_bit_scan_is_turned_upright_as_its_exif_says():
    """A 16-bit scan whose EXIF says to turn it a quarter gives the digit of the 8-bit drawing turned so."""
    eight = drawn_seven(size=(300, 220))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show it
    buffer = io.BytesIO()
    wide(np.asarray(eight).astype(np.uint32) * 257, "I;16").save(buffer, format="PNG", exif=exif)
    upright = eight.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(prepare_digit(buffer.getvalue()), prepare_digit(upright))


@pytest.mark.parametrize("mode, scale, offset", [("I", 1000, -40_000), ("F", 1 / 255, 0.25)])
def test_32_bit_and_float_scans_are_scaled_by_their_own_range(mode, scale, offset):
    """A TIFF of 32-bit integers (I) or floats (F), whatever their range, reads as the 8-bit drawing stretched from
    its darkest to its lightest pixel: exactly its digit."""
    eight = np.asarray(drawn_seven(ink=30, paper=225), dtype=np.float64)
    scan = encoded(wide(eight * scale + offset, mode), "TIFF")
    assert Image.open(io.BytesIO(scan)).mode == mode
    stretched = np.round((eight - 30) * (255 / (225 - 30))).astype(np.uint8)
    assert np.array_equal(prepare_digit(scan), prepare_digit(encoded(Image.fromarray(stretched), "PNG")))


def test_a_callers_own_image_is_never_changed():
    """prepare_digit shrinks, turns and converts new images: the PIL image a caller passes keeps its size and pixels."""
    image = drawn_seven(size=(1200, 880), box=(600, 160, 920, 720), width=48).convert("RGBA")
    before = np.asarray(image).copy()
    prepare_digit(image)
    assert image.size == (1200, 880) and np.array_equal(np.asarray(image), before)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "RGB", "L", "P"])
def test_shrinking_in_bands_is_pillows_resize_pixel_for_pixel(mode):
    """digits.shrunk, which averages blocks of pixels a band at a time, gives exactly Pillow's resize with the same
    reducing gap (what thumbnail() does; with alpha, on premultiplied pixels), for every mode and sizes that leave
    part blocks at the edges."""
    rng = np.random.default_rng(4)
    premultiplied = {"LA": "La", "RGBA": "RGBa"}.get(mode, mode)  # written out: Pillow 11 skips the gap with alpha
    for width, height in ((1283, 961), (4000, 37), (700, 3001)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode)
        size = (97, max(1, round(height * 97 / width)))
        resized = image.convert(premultiplied).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
        expected = resized.convert(mode)
        got = shrunk(image, size)
        assert got.mode == expected.mode and np.array_equal(np.asarray(got), np.asarray(expected)), (width, height)


MEASURE = """
import sys
from pathlib import Path
from digits import prepare_digit

def peak():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])

data = Path(sys.argv[1]).read_bytes()
before = peak()
prepare_digit(data)
print((peak() - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from /proc")
@pytest.mark.parametrize("mode", ["RGBA", "RGB"])
def test_a_large_image_is_held_once_while_it_is_prepared(tmp_path, mode):
    """A 4000x4000 PNG (64 MB decoded: Pillow keeps 4 bytes a pixel) raises a fresh process's peak memory by about
    the decoded image, not twice that: no copy of it is made to turn it, shrink it or premultiply its alpha."""
    image = Image.new(mode, (4000, 4000), "white")
    ImageDraw.Draw(image).line([(1000, 800), (3000, 800), (1700, 3200)], fill="black", width=300)
    image.save(tmp_path / "large.png")
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, tmp_path / "large.png"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    decoded = 4000 * 4000 * 4
    assert int(result.stdout) < 1.4 * decoded, f"{int(result.stdout) / 2**20:.0f} MB"


def test_predict_prepares_every_form_of_image(tmp_path, trained_run):
    """predict() sends files, PIL images and arrays through prepare_digit, and matches prepare_digit + prepare=False."""
    model, _ = load_checkpoint(trained_run / "best.pt")
    drawing = drawn_seven()
    drawing.save(tmp_path / "seven.png")
    forms = [
        str(tmp_path / "seven.png"),
        tmp_path / "seven.png",
        drawing,
        np.asarray(drawing),
        torch.from_numpy(np.array(drawing)),
    ]
    expected = predict(model, prepare_digit(drawing), prepare=False)[1]
    for form in forms:
        assert torch.allclose(predict(model, form)[1], expected)
    assert predict(model, forms[:3])[1].shape == (3, 10)


@pytest.fixture
def photos(tmp_path) -> dict:
    """Image files of every kind predict.py meets: good photos (JPEG, PNG), a text file, a blank page, a missing path."""
    rng = np.random.default_rng(3)
    drawing = np.asarray(prepare_digit(drawn_seven()))
    files = {}
    for name in ("a.jpg", "b.png"):
        data = photograph(drawing, rng)
        path = tmp_path / name
        path.write_bytes(data)
        files[name] = path
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (120, 90), "white").save(tmp_path / "blank.png")
    files.update(
        {
            "notes.txt": tmp_path / "notes.txt",
            "blank.png": tmp_path / "blank.png",
            "missing.png": tmp_path / "missing.png",
        }
    )
    return files


def run_predict(capsys, *args):
    return call_main(capsys, predict_cli.main, args)


def test_cli_prints_one_line_per_image_and_goes_on_after_bad_files(photos, trained_run, capsys):
    """Each good file gets a line (path, digit, probability); each bad one an error line; exit 1 when any failed."""
    names = ["a.jpg", "notes.txt", "b.png", "blank.png", "missing.png"]
    result = run_predict(capsys, *(photos[n] for n in names), "--checkpoint", trained_run / "best.pt")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(photos["a.jpg"]), str(photos["b.png"])]
    assert all(line.split(": ")[1][0].isdigit() and "%)" in line for line in lines)
    using, *errors = result.stderr.splitlines()  # first, which checkpoint it uses
    assert using.startswith(f"using {trained_run / 'best.pt'}: ")
    assert errors == [
        f"error: {photos['notes.txt']}: not a PNG, JPEG, WEBP, GIF, BMP or TIFF image",
        f"error: {photos['blank.png']}: no digit found: nothing stands out from the background",
        f"error: {photos['missing.png']}: no such file",
    ]
    assert run_predict(capsys, photos["a.jpg"], "--checkpoint", trained_run / "best.pt").returncode == 0


def test_cli_json_is_one_list_for_scripts(photos, trained_run, capsys):
    """--json prints one JSON list of {path, digit, confidence, probabilities}, digit being the most probable."""
    result = run_predict(capsys, photos["a.jpg"], photos["b.png"], "--json", "--checkpoint", trained_run / "best.pt")
    assert result.returncode == 0
    answers = json.loads(result.stdout)
    assert [a["path"] for a in answers] == [str(photos["a.jpg"]), str(photos["b.png"])]
    for answer in answers:
        assert set(answer) == {"path", "digit", "confidence", "probabilities"}
        assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert answer["confidence"] == max(answer["probabilities"]) == answer["probabilities"][answer["digit"]]


def test_cli_uses_the_latest_run_and_says_when_there_is_none(photos, trained_run, tmp_path, capsys, monkeypatch):
    """Without --checkpoint predict.py takes the latest run's best.pt; with no run at all it says how to make one."""
    monkeypatch.chdir(tmp_path)
    message = run_predict(capsys, photos["a.jpg"]).stderr
    assert message.strip() == "error: no run in runs/ has a best.pt yet; train one with `python train.py`"
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    assert run_predict(capsys, photos["a.jpg"]).returncode == 0


def test_photographed_real_digits_are_read_at_97_percent(real_run):
    """Real MNIST test digits, photographed (scaled, off-centre, mostly dark on light, light, blur, noise, tint,
    JPEG/PNG), are classified at >= 97% through prepare_digit; MNIST itself loses at most 0.2 points through it."""
    from conftest import REAL_DATA

    model, _ = load_checkpoint(real_run / "best.pt")
    images, labels = load_split(REAL_DATA, train=False, download=False)
    photos, photo_labels = photo_set(images, labels, count=300)
    prepared = torch.from_numpy(np.stack([prepare_digit(photo) for photo in photos]))
    assert (model_logits(model, prepared).argmax(dim=1) == photo_labels).float().mean() >= 0.97
    subset = slice(0, 3000)
    as_is = (model_logits(model, images[subset]).argmax(dim=1) == labels[subset]).float().mean()
    through = torch.from_numpy(np.stack([prepare_digit(image.numpy()) for image in images[subset]]))
    assert (model_logits(model, through).argmax(dim=1) == labels[subset]).float().mean() >= as_is - 0.002
