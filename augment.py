"""Random affine augmentation of whole training batches, on the batch's device.

Each training image gets its own rotation, scale, shear and shift, drawn from a torch.Generator
seeded by (seed, epoch, step): a pure function of those and the image's place in the batch, like
data.epoch_order is of (seed, epoch). Nothing is drawn from the global RNG. So a resumed run warps
every image as the unbroken run did, and under torchrun each process draws the whole batch's
parameters and keeps its own share, warping each image as one process would. One affine_grid and
one grid_sample do the whole batch: no loop over images, no PIL. Only train.py's training step calls
this; validation, test, evaluate.py and predict() (so everything built on it) see the images unchanged.
"""

import hashlib
import math

import torch
import torch.nn.functional as F

from config import Config
from data import normalize

# A black MNIST pixel after data.normalize() (about -0.42), to the bit, so black stays exactly black.
# Pixels that come in from outside the image must be this, not 0, which is the mean grey after normalize().
BACKGROUND = normalize(torch.zeros(1, 1, dtype=torch.uint8)).item()
SIDE = 28  # MNIST's image side in pixels; affine_grid measures shifts in half-sides


def generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of batch `step` of epoch `epoch`. Hashing keeps its stream apart from every other
    (seed, epoch, step) and from epoch_order's, which seeds torch with small integers."""
    digest = hashlib.sha256(f"augment {seed} {epoch} {step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def affine_matrices(cfg: Config, count: int, epoch: int, step: int) -> torch.Tensor:
    """(count, 2, 3) float64 matrices for affine_grid, one per image of the whole batch, on the CPU.

    Each maps an output pixel to the input pixel it reads (normalised coordinates, centre 0): the
    inverse of moving the digit by rotate/scale/shear about the centre and then shifting it."""
    u = torch.rand(count, 5, generator=generator(cfg.seed, epoch, step), dtype=torch.float64) * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(cfg.aug_rotate)
    scale = 1 + u[:, 1] * cfg.aug_scale
    shear = u[:, 2] * math.radians(cfg.aug_shear)
    shift = u[:, 3:5] * cfg.aug_shift * (2 / SIDE)  # pixels -> normalised units, (count, 2) as (x, y)
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    # The digit moves by scale * rotation @ [[1, tan], [0, 1]] (a horizontal shear); this is its inverse.
    inverse = (
        torch.stack([torch.stack([cos + tan * sin, sin - tan * cos], -1), torch.stack([-sin, cos], -1)], -2)
        / scale[:, None, None]
    )  # (count, 2, 2)
    return torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)  # (count, 2, 3)


def batch(
    images: torch.Tensor, cfg: Config, epoch: int, step: int, whole: int, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """This rank's share of training batch `step` of `epoch`, each image warped by its own random affine.

    `images` is (B, 1, 28, 28), normalised: rank `rank`'s part of a whole batch of `whole` images cut in
    `world` parts, as MNISTData.batches cuts it. With cfg.augment off, `images` comes back untouched."""
    if not cfg.augment or len(images) == 0:  # a rank's share of the last batch may be empty under torchrun
        return images
    theta = affine_matrices(cfg, whole, epoch, step).tensor_split(world)[rank]
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with zeros: shift the background to 0 and back, so what comes in is black.
    return (
        F.grid_sample(images - BACKGROUND, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        + BACKGROUND
    )
