"""How well a checkpoint reads "photographed" digits, with and without MNIST's preprocessing. Run by hand:

    python benchmarks/photos.py --data-dir ../shared/data                 # the latest run's best.pt
    python benchmarks/photos.py --data-dir ../shared/data --checkpoint runs/cnn/best.pt --figure docs/photos.png
    python benchmarks/photos.py --data-dir ../shared/data --checkpoint runs/cnn/best.pt --phone --count 300

The photos are MNIST test digits made to look like phone pictures of ink on paper by fake_photos.py
(`photo_set`); the same seed gives the same photos. It prints accuracy through prepare_digit against a plain
resize to 28x28, and what prepare_digit costs on the MNIST test set itself, which already looks like MNIST.

With --phone the photos are scaled up to phone size (about 12 megapixels, JPEG) and read twice: decoded in
full, and as prepare_digit reads a file, with JPEG's draft mode (1/2, 1/4 or 1/8 scale, at least 512 px). It
prints both accuracies, how many answers differ, and the median CPU time per photo of each.
"""

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from PIL import Image

from data import load_split
from digits import load_image, prepare_digit
from fake_photos import photo_set
from model import load_checkpoint, model_logits
from rundir import latest_checkpoint


def phone_size(photo: bytes, megapixels: float = 12) -> bytes:
    """The photo scaled up to about `megapixels` (its aspect kept) and saved as a JPEG, as a phone camera would."""
    image = load_image(photo).convert("RGB")
    scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def cpu_ms(function, *args) -> tuple[object, float]:
    """function(*args) and the CPU time it took, in ms."""
    start = time.process_time()
    result = function(*args)
    return result, (time.process_time() - start) * 1000


def draft_or_not(model, photos, labels) -> None:
    """Accuracy and median CPU time of prepare_digit on phone-sized JPEGs, decoded in full and in draft mode."""
    full, draft, full_ms, draft_ms = [], [], [], []
    for photo in map(phone_size, photos):
        digit, ms = cpu_ms(lambda data: prepare_digit(load_image(data)), photo)  # a PIL image: no draft
        full.append(digit)
        full_ms.append(ms)
        digit, ms = cpu_ms(prepare_digit, photo)  # the bytes, as predict.py and the demo pass a file
        draft.append(digit)
        draft_ms.append(ms)
    answers = [model_logits(model, torch.from_numpy(np.stack(d))).argmax(dim=1) for d in (full, draft)]
    print(f"{len(photos)} photographed test digits at about 12 megapixels (JPEG):")
    for name, answer, ms in (("decoded in full", answers[0], full_ms), ("draft mode    ", answers[1], draft_ms)):
        accuracy_ = (answer == labels).float().mean().item()
        print(f"  {name}: {accuracy_:.2%}, prepare_digit {statistics.median(ms):.0f} ms CPU a photo (median)")
    print(f"  answers that differ: {(answers[0] != answers[1]).sum().item()}")


def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    return (model_logits(model, pixels).argmax(dim=1).cpu() == labels).float().mean().item()


def plain_resize(photo: bytes) -> np.ndarray:
    """What a naive script does: greyscale and squash the whole picture to 28x28."""
    return np.asarray(load_image(io.BytesIO(photo)).convert("L").resize((28, 28), Image.Resampling.BILINEAR))


def before_and_after(photos, prepared, path: Path, count: int = 8) -> None:
    from matplotlib.figure import Figure  # a Figure needs no backend: files only, no display

    fig = Figure(figsize=(count * 1.4, 3))
    axes = fig.subplots(2, count)
    for i in range(count):
        axes[0, i].imshow(load_image(io.BytesIO(photos[i])).convert("RGB"))
        axes[1, i].imshow(prepared[i], cmap="gray", vmin=0, vmax=255)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("photographed", loc="left", fontsize=9)
    axes[1, 0].set_title("prepare_digit", loc="left", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--checkpoint", type=Path, help="default: the latest run's best.pt")
    parser.add_argument("--count", type=int, default=2000, help="photographed digits to classify")
    parser.add_argument("--figure", type=Path, help="also draw photos before and after prepare_digit into this PNG")
    parser.add_argument("--phone", action="store_true", help="phone-sized photos: full decoding against draft mode")
    args = parser.parse_args()

    checkpoint = args.checkpoint or latest_checkpoint()
    model, _ = load_checkpoint(checkpoint)
    images, labels = load_split(args.data_dir, train=False, download=False)
    photos, photo_labels = photo_set(images, labels, args.count)
    if args.phone:
        print(f"checkpoint {checkpoint}")
        return draft_or_not(model, photos, photo_labels)
    start = time.perf_counter()
    prepared = np.stack([prepare_digit(io.BytesIO(photo)) for photo in photos])
    per_photo = (time.perf_counter() - start) / len(photos)
    plain = np.stack([plain_resize(photo) for photo in photos])
    mnist_prepared = np.stack([prepare_digit(image.numpy()) for image in images])

    print(f"checkpoint {checkpoint}")
    print(
        f"photographed test digits, {args.count}: prepare_digit {accuracy(model, torch.from_numpy(prepared), photo_labels):.2%}, "
        f"plain resize to 28x28 {accuracy(model, torch.from_numpy(plain), photo_labels):.2%} "
        f"(prepare_digit: {per_photo * 1000:.0f} ms a photo)"
    )
    print(
        f"MNIST test set, {len(labels):,}: as it is {accuracy(model, images, labels):.2%}, "
        f"through prepare_digit {accuracy(model, torch.from_numpy(mnist_prepared), labels):.2%}"
    )
    if args.figure:
        before_and_after(photos, prepared, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
