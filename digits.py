"""A user's own digit, photographed or scanned, turned into an MNIST digit: `prepare_digit`.

MNIST digits are light on dark, fitted into a 20x20 box with their aspect ratio kept, and
centred by centre of mass in 28x28. A photo is dark ink on light paper, of any size, off-centre,
with uneven light and noise. A model trained on MNIST sees the photo the way it was trained
only after the same steps, so predict.py, model.predict() and the notebook all call this.
"""

import io
import math

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

WORK_SIZE = 256  # longest side the cleaning works at: keeps strokes several pixels wide, and is quick
INK_LEVEL = 0.25  # after cleaning, the share of the stroke's brightness from which a pixel counts as ink
MIN_CONTRAST = 0.12  # ink must stand this far (on a 0-1 scale) above what is left of the background
# 64 megapixels decode to 256 MB (Pillow keeps 4 bytes a pixel, RGB too; prepare_digit's peak memory grows by 255 MB
# for an 8000x8000 PNG, measured); a 60,000 x 60,000 PNG of a few hundred KB would decode to 11 GB
MAX_PIXELS = 64_000_000
# The raster formats photos, scans and drawings come in. Pillow would otherwise try every plugin it has, and some
# hand the file to another program: an EPS goes to Ghostscript, a PostScript interpreter, when it is installed.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ORIENTATION = 0x0112  # the EXIF tag in which a camera says how to turn the picture upright, as ImageOps reads it
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class NoDigit(ValueError):
    """The image holds no ink that stands out from its background."""


def load_image(source, draft: int | None = None) -> Image.Image:
    """A PIL image from a path, a file object, raw bytes, a numpy array or a PIL image, whose file is in one of
    FORMATS, decoded, turned upright as its EXIF says, and 8-bit if it was wider greyscale (eight_bit). Raises
    ValueError, whatever is wrong with the file. With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size as
    long as both sides stay at least `draft` pixels: a 12-megapixel photo in a fraction of the time and memory."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        array = source if source.dtype == np.uint8 else (np.clip(source, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        image = Image.open(source, formats=FORMATS)  # reads only the header: the size is known before any pixel
    except Image.DecompressionBombError:  # PIL's own, larger limit trips inside open() for the very largest
        raise ValueError(f"more than the {MAX_PIXELS // 10**6}-megapixel limit; scale the image down") from None
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ValueError(f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from None
    except OSError as e:
        raise ValueError(f"cannot read it ({e.strerror or e})") from None
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(
            f"{image.width}x{image.height} pixels is more than the {MAX_PIXELS // 10**6}-megapixel "
            f"limit; scale the image down"
        )
    try:
        if draft and image.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG that holds more pictures (depth, ...)
            image.draft(image.mode, (draft, draft))
        image.load()
    except MemoryError:  # the machine's trouble, not the file's
        raise
    except Exception as e:  # a damaged file: Pillow's decoders raise OSError, SyntaxError, ValueError, TypeError,
        # struct.error, IndexError, ... as they meet it; each is one line about this file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"cannot read it: the file is damaged or cut short ({reason})") from None
    try:  # phone photos store their rotation as an EXIF tag
        turn = UPRIGHT.get(image.getexif().get(ORIENTATION))
    except Exception:  # a damaged EXIF block, with its picture intact: read the picture as it is stored
        turn = None
    image = eight_bit(image)  # here, where the format is known, and before turning: fewer bytes to turn
    return image.transpose(turn) if turn is not None else image  # turning copies: only a turned image pays for it


def eight_bit(image: Image.Image) -> Image.Image:
    """A greyscale image of a wide mode as mode L: 16-bit (I;16, as scanners write PNG and TIFF) divided by 257, so
    that it reads exactly as its 8-bit version; 32-bit integers (I) and floats (F) scaled by their own range. PIL's
    convert("L") would clip every value to 255. Other modes are returned as they are."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):  # Pillow 10.1 opens a
        # 16-bit greyscale PNG as I (10.4 as I;16): a PNG holds no wider integers
        low, high = 0, 65535
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("its pixels include infinite values; save it as 8- or 16-bit")
    else:
        return image
    scale = 255 / (high - low) if high > low else 0
    out = np.empty((image.height, image.width), dtype=np.uint8)
    rows = max(1, 2**20 // image.width)  # a band of rows at a time: a few MB of floats, whatever the image's size
    for top in range(0, image.height, rows):
        band = np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))), dtype=np.float64)
        out[top : top + rows] = np.nan_to_num(np.round((band - low) * scale))  # a float image's NaN: 0
    return Image.fromarray(out)


def small_image(source) -> Image.Image:
    """The image decoded (a JPEG in draft mode, at no less than twice the working size: the LANCZOS resize below
    still does the smoothing), wide greyscale made 8-bit (a caller's own PIL image too), and shrunk to WORK_SIZE at
    most. This is the step of prepare_digit that holds the full-size image, once: shrinking makes a new image
    rather than copying it to shrink in place, so a caller's own PIL image is never changed."""
    image = eight_bit(load_image(source, draft=2 * WORK_SIZE))
    if max(image.size) > WORK_SIZE:
        scale = WORK_SIZE / max(image.size)
        image = shrunk(image, (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image


def shrunk(image: Image.Image, size: tuple[int, int], gap: float = 2.0) -> Image.Image:
    """image.resize(size, LANCZOS, reducing_gap=gap), as thumbnail() makes it, step for step and pixel for pixel
    (with alpha, as Pillow 13 does: up to 11 it skips the reducing step there), but without a second full-size
    image: Pillow first converts the whole of an image with alpha to premultiplied alpha (RGBA to RGBa: 256 MB
    more for 64 megapixels). Here the first step, an average over blocks of factor x factor pixels, runs on bands
    of whole blocks; the LANCZOS resize then works on the image that much smaller."""
    factor = (int(image.width / size[0] / gap) or 1, int(image.height / size[1] / gap) or 1)
    if image.mode in ("1", "P") or factor == (1, 1):  # 1 and P: nearest neighbour, which makes no copy anyway
        return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=gap)
    mode = {"LA": "La", "RGBA": "RGBa"}.get(image.mode, image.mode)
    fx, fy = factor
    reduced = Image.new(mode, (-(-image.width // fx), -(-image.height // fy)))
    rows = fy * max(1, 2**20 // (image.width * fy))  # a band of whole blocks, about a megapixel
    for top in range(0, image.height, rows):
        band = image.crop((0, top, image.width, min(top + rows, image.height)))
        reduced.paste(band.convert(mode).reduce(factor), (0, top // fy))
    box = (0, 0, image.width / fx, image.height / fy)  # where the image lies in the reduced one, as Pillow computes it
    return reduced.resize(size, Image.Resampling.LANCZOS, box=box).convert(image.mode)


def grey(image: Image.Image) -> np.ndarray:
    """Float greyscale in [0, 1]; transparent pixels count as white paper."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def remove_background(x: np.ndarray) -> np.ndarray:
    """Subtract a smooth (quadratic) illumination fitted to the darker half of the pixels: the background."""
    h, w = x.shape
    rows, cols = np.mgrid[0:h, 0:w]
    u, v = cols.ravel() / w - 0.5, rows.ravel() / h - 0.5
    basis = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)
    values = x.ravel()
    background = values <= np.percentile(values, 50)
    for _ in range(2):  # refit on the pixels the first surface calls background
        coef, *_ = np.linalg.lstsq(basis[background], values[background], rcond=None)
        surface = basis @ coef
        residual = values - surface
        background = residual <= np.percentile(residual[background], 90)
    return np.clip(residual, 0, None).reshape(h, w)


def remove_uneven_background(x: np.ndarray, blocks: int = 8) -> np.ndarray:
    """Subtract the local background: the 10th percentile of each of blocks x blocks tiles, taken as the
    darkest of its neighbours (a tile that is mostly stroke borrows from one beside it), smoothed and
    spread back over the image. Follows light that falls off in any shape, not only a plane."""
    h, w = x.shape
    edges_r, edges_c = np.linspace(0, h, blocks + 1).astype(int), np.linspace(0, w, blocks + 1).astype(int)
    grid = np.array(
        [
            [np.percentile(x[edges_r[i] : edges_r[i + 1], edges_c[j] : edges_c[j + 1]], 10) for j in range(blocks)]
            for i in range(blocks)
        ],
        dtype=np.float32,
    )
    padded = np.pad(grid, 1, mode="edge")
    grid = np.min([padded[i : i + blocks, j : j + blocks] for i in range(3) for j in range(3)], axis=0)
    padded = np.pad(grid, 1, mode="edge")
    grid = np.mean([padded[i : i + blocks, j : j + blocks] for i in range(3) for j in range(3)], axis=0)
    background = np.asarray(Image.fromarray(grid.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    return np.clip(x - background, 0, None)


def otsu(x: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the level that maximises the variance between the two sides."""
    counts, edges = np.histogram(x, bins=bins, range=(0, 1))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    below, above = weight[:-1], weight[-1] - weight[:-1]
    between = (mean[-1] * below - mean[:-1] * weight[-1]) ** 2 / np.maximum(below * above, 1)
    return float(edges[1:-1][np.argmax(between)])


def fit_to_mnist(ink: np.ndarray) -> np.ndarray:
    """Fit the ink into 20x20, aspect ratio kept, and centre its centre of mass in 28x28, as MNIST was made."""
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(ink.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    small = np.clip(small, 0, 1)
    total = small.sum()
    rows, cols = np.indices(small.shape)
    cy, cx = (rows * small).sum() / total, (cols * small).sum() / total
    top, left = round(14 - cy), round(14 - cx)
    top, left = min(max(top, 0), 28 - small.shape[0]), min(max(left, 0), 28 - small.shape[1])
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return out


def prepare_digit(source) -> np.ndarray:
    """Any image of one digit -> a 28x28 uint8 MNIST digit, light on dark, sized and centred like MNIST's.

    `source` is a file path, a file object, bytes, a PIL image or an array; of any size, grey or
    colour, dark ink on light paper or light on dark. Raises ValueError with a short reason (NoDigit
    when no ink stands out), for one line per file in predict.py.
    """
    x = grey(small_image(source))
    low, middle, high = np.percentile(x, [1, 50, 99])
    if middle - low > high - middle:  # the background (the majority) is the light side: dark ink on paper
        x = 1 - x
    small = min(x.shape) < 64  # already digit-sized, like MNIST itself: no filtering that would blur it
    if small:
        x = remove_background(x)
    else:  # a 5x5 median removes sensor noise and specks; strokes at this size are wider than that
        x = remove_uneven_background(x)
        top = max(float(x.max()), 1e-6)  # the median runs far faster on 8-bit pixels than on floats
        eight_bit = Image.fromarray((x / top * 255).round().astype(np.uint8))
        x = np.asarray(eight_bit.filter(ImageFilter.MedianFilter(5)), dtype=np.float32) / 255 * top
    peak = np.percentile(x, 99.9)
    if peak < MIN_CONTRAST:
        raise NoDigit("no digit found: nothing stands out from the background")
    x = np.clip(x / peak, 0, 1)
    level = INK_LEVEL if small else max(INK_LEVEL, otsu(x))  # Otsu: the level that best splits ink from the rest
    mask = x > level
    if not small:  # the bounding box from an opened mask, so that a stray speck does not widen it
        opened = (
            np.asarray(
                Image.fromarray(mask.astype(np.uint8) * 255)
                .filter(ImageFilter.MinFilter(3))
                .filter(ImageFilter.MaxFilter(3))
            )
            > 0
        )
        mask = opened if opened.any() else mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    ink = np.where(x > level / 2, x, 0)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = fit_to_mnist(ink)
    return (digit / max(digit.max(), 1e-6) * 255).round().astype(np.uint8)
