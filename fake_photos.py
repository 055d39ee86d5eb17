"""MNIST digits made to look like phone pictures of ink on paper, for measurements: `photograph` and `photo_set`.

Nothing at run time uses this; benchmarks/photos.py, the tests and the notebook's example photo do. The photos are
scaled 3-10x and off-centre on a larger canvas, mostly dark on light, under uneven light, blurred, with sensor
noise, grey or tinted, saved as JPEG or PNG. The same generator state gives the same photos.
"""

import io

import numpy as np
import torch
from PIL import Image, ImageFilter


def photograph(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 28x28 MNIST digit as if written on paper and photographed: scaled 3-10x, off-centre on a larger
    canvas, mostly dark on light, uneven light, blur, sensor noise, grey or tinted, as JPEG or PNG bytes."""
    scale = rng.uniform(3, 10)
    size = round(28 * scale)
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    height, width = (round(size * rng.uniform(1.3, 2.5)) for _ in range(2))
    top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top : top + size, left : left + size] = ink
    if rng.random() < 0.75:  # dark ink on light paper
        paper, pen = rng.uniform(0.7, 0.95), rng.uniform(0.05, 0.3)
    else:
        paper, pen = rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95)
    picture = paper + (pen - paper) * canvas
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:height, 0:width]
    ramp = np.cos(angle) * cols / width + np.sin(angle) * rows / height
    picture *= 1 - rng.uniform(0.2, 0.45) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)  # light from one side
    focus = ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * scale / 3)
    picture = np.asarray(Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)).filter(focus)) / 255
    picture = picture + rng.normal(0, rng.uniform(0.01, 0.05), picture.shape)
    picture = (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(picture)
    if rng.random() < 0.5:  # tinted colour: warm paper under indoor light, say
        tint = rng.uniform(0.8, 1.0, size=3)
        image = Image.fromarray((np.asarray(image.convert("RGB")) * tint).astype(np.uint8))
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_set(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int = 0):
    """`count` photographed test digits (as encoded JPEG/PNG bytes) and their labels, the same for the same seed."""
    rng = np.random.default_rng(seed)
    index = rng.choice(len(labels), size=count, replace=False)
    return [photograph(images[i].numpy(), rng) for i in index], labels[index]
