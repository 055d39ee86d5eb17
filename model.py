"""The networks, the one checkpoint loader, and predict() for notebooks.

from model import load_checkpoint, predict
from rundir import latest_checkpoint
model, ckpt = load_checkpoint(latest_checkpoint())   # the latest run's best.pt, in eval mode, on CPU
classes, probs = predict(model, ["photo.jpg"])       # files, PIL images, arrays or tensors of any size
"""

import io
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import UserError
from data import MNIST_MEAN, MNIST_STD, normalize
from digits import prepare_digit
from rundir import atomic_write


class CNN(nn.Module):
    """The reference post's network: two conv stages, then one linear layer. 8,490 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        # Pooling and ReLU as modules, so that a forward hook sees each stage as the post draws it (a hook on a
        # conv sees its maps before pooling). They hold no parameters: a checkpoint saved before still loads.
        self.pool1, self.relu1 = nn.MaxPool2d(2), nn.ReLU()
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.pool2, self.relu2 = nn.MaxPool2d(2), nn.ReLU()
        self.fc = nn.Linear(320, 10)

    def layers(self, x) -> dict[str, torch.Tensor]:  # (B, 1, 28, 28)
        """Every stage's output: conv1 and conv2 after pooling and ReLU, and the logits."""
        conv1 = self.relu1(self.pool1(self.conv1(x)))  # (B, 10, 12, 12)
        conv2 = self.relu2(self.pool2(self.conv2(conv1)))  # (B, 20, 4, 4)
        return {"conv1": conv1, "conv2": conv2, "logits": self.fc(conv2.flatten(1))}  # logits (B, 10)

    def forward(self, x):
        return self.layers(x)["logits"]


class FCNN(nn.Module):
    """The fully connected baseline: every pixel gets a weight to every hidden unit."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.relu = nn.ReLU()  # no parameters, as in CNN
        self.fc2 = nn.Linear(hidden, 10)

    def layers(self, x) -> dict[str, torch.Tensor]:  # (B, 1, 28, 28)
        """The hidden layer after ReLU (B, hidden), and the logits (B, 10)."""
        hidden = self.relu(self.fc1(x.flatten(1)))
        return {"hidden": hidden, "logits": self.fc2(hidden)}

    def forward(self, x):
        return self.layers(x)["logits"]


MODELS = {"cnn": CNN, "fcnn": FCNN}

# oneDNN runs this CNN's small convolutions 1.3-1.5x faster on CPU with channels-last tensors
# (benchmarks/speed.py measures the ratio). With one input channel the data's bytes do not move; on CUDA it is neutral.
MEMORY_FORMAT = torch.channels_last


def build_model(name: str, **model_args) -> nn.Module:
    """A fresh model by name, as config.model spells it, in MEMORY_FORMAT."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**model_args).to(memory_format=MEMORY_FORMAT)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- checkpoints -----------------------------------------------------------------


def to_cpu(value):
    """A copy of a (nested) state dict with every tensor on the CPU, so the file loads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def save_checkpoint(ckpt: dict, path) -> None:
    """Write a checkpoint dict atomically, with every tensor moved to the CPU."""
    buffer = io.BytesIO()
    torch.save(to_cpu(ckpt), buffer)
    atomic_write(path, buffer.getvalue())


# The starts of the warnings torch.load gives for files that are not checkpoints (as torch 2.14 words them).
TORCH_LOAD_WARNINGS = ("Detected pickle protocol", "'torch.load' received a zip file that looks like a TorchScript")


def read_checkpoint(path, device="cpu", needs=()) -> dict:
    """The checkpoint dict at `path`, loaded with weights_only=True so that no code in the file can run; refused
    in one line if it lacks one of the keys `needs` names (beyond the model's, which every use needs)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train one with `python train.py` or check the path")
    try:
        with warnings.catch_warnings():
            # A plain pickle or a TorchScript file makes torch warn before it fails: the one error line below says it.
            for message in TORCH_LOAD_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # garbage bytes make the unpickler fail in many ways (KeyError, EOFError, ...)
        wanted = re.search(r"GLOBAL (\S+)", str(e))  # a class or function the file wants to call while loading
        if isinstance(e, pickle.UnpicklingError) and wanted and wanted[1] == "torch.storage._load_from_bytes":
            raise UserError(  # how pickle.dump writes a tensor; that function loads it with code allowed to run
                f"refused to load {path}: it was written with pickle.dump, whose tensors could run code while "
                f"loading; save the dict with torch.save"
            ) from None
        if isinstance(e, pickle.UnpicklingError) and wanted:
            raise UserError(
                f"refused to load {path}: it would call {wanted[1]} while loading, which could run code; "
                f"checkpoints hold only tensors and plain values"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint: truncated, damaged or not a torch file") from None
    if not isinstance(ckpt, dict) or not {"model", "model_name", "model_args"} <= ckpt.keys():
        raise UserError(
            f"{path} is a torch file but not a checkpoint of this project (no model, model_name, model_args)"
        )
    lacking = [key for key in needs if key not in ckpt]
    if lacking:
        raise UserError(f"{path} holds a model but no {', '.join(lacking)}: it is not a whole checkpoint of train.py")
    return ckpt


def load_checkpoint(path, device="cpu", needs=()) -> tuple[nn.Module, dict]:
    """Rebuild the model saved at `path`; return it on `device` in eval mode, with the checkpoint dict (which must
    hold the keys `needs` names too)."""
    ckpt = read_checkpoint(path, device, needs)
    return rebuild_model(ckpt, path).to(device).eval(), ckpt


def rebuild_model(ckpt: dict, path) -> nn.Module:
    """The model a checkpoint dict describes, with its weights (`path` names the file in errors).

    Every part is checked before the model is built, so that a damaged or hand-edited dict gives one line, and
    model_args such as a hidden size of 10**12 are refused before they allocate anything."""
    name, args, weights = ckpt["model_name"], ckpt["model_args"], ckpt["model"]
    if not isinstance(name, str) or name not in MODELS:
        raise UserError(f"{path} holds a model_name of {short(name)}, not one of this project's: {', '.join(MODELS)}")
    if not isinstance(args, dict):
        raise UserError(f"{path} holds model_args of {short(args)}, where a dict of {name}'s arguments belongs")
    try:
        with torch.device("meta"):  # shapes and dtypes without memory
            wanted = MODELS[name](**args).state_dict()
    except Exception as e:  # a wrong name, type or value makes the constructor fail in many ways
        raise UserError(
            f"{path} holds model_args {short(args)} that do not build a {name} model ({short(e)})"
        ) from None
    if not isinstance(weights, dict):
        raise UserError(f"{path} holds its weights as a {type(weights).__name__}, where a state_dict (a dict) belongs")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path} holds a {type(value).__name__} as the weight {short(key)}, where a tensor belongs")
    misfits = [f"no {k}" for k in wanted if k not in weights]
    misfits += [f"unexpected {short(k)}" for k in weights if k not in wanted]
    misfits += [
        f"{k} is {tuple(weights[k].shape)} {weights[k].dtype}, not {tuple(t.shape)} {t.dtype}"
        for k, t in wanted.items()
        if k in weights and (weights[k].shape != t.shape or not torch.can_cast(weights[k].dtype, t.dtype))
    ]
    if misfits:
        built = f"a {name} model" + (f" with {short(args)}" if args else "")
        more = f"; and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        raise UserError(f"the weights in {path} do not fit {built} ({'; '.join(misfits[:3])}{more})")
    model = build_model(name, **args)
    model.load_state_dict(weights)
    return model


def short(value, limit=80) -> str:
    """repr(value) cut to `limit` characters, for an error line about a value that may be huge."""
    text = " ".join(str(value).split()) if isinstance(value, Exception) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- inference ---------------------------------------------------------------------


def _as_uint8_batch(images) -> torch.Tensor:
    """PIL image(s), uint8 array(s) or tensor(s) of 28x28 digits -> uint8 tensor (N, 28, 28)."""
    if isinstance(images, (list, tuple)):
        return torch.cat([_as_uint8_batch(image) for image in images])
    if hasattr(images, "convert"):  # a PIL image, in any mode
        images = np.asarray(images.convert("L"))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))  # a copy: PIL gives read-only arrays
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"predict() takes PIL images, numpy arrays or tensors, not {type(images).__name__}")
    if images.is_floating_point():  # floats are taken to be in [0, 1], as ToTensor gives them
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if images.dtype != torch.uint8:
        raise TypeError(f"predict() takes uint8 pixels (0-255) or floats in [0, 1], not {images.dtype}")
    if images.shape[-2:] != (28, 28) or images.dim() > 4 or (images.dim() == 4 and images.shape[1] != 1):
        raise ValueError(f"predict() takes 28x28 digits, one or a batch, not shape {tuple(images.shape)}")
    return images.reshape(-1, 28, 28)


@torch.inference_mode()
def model_logits(model: nn.Module, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """float32 logits (N, 10), on the model's device, of uint8 digits (N, 28, 28) normalised as in training."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [  # range(0, N, batch) is empty for N = 0, so one batch always runs: (0, 10) for no images
            model(normalize(pixels[i : i + batch_size].to(device)).contiguous(memory_format=MEMORY_FORMAT)).float()
            for i in range(0, max(len(pixels), 1), batch_size)
        ]
    )


@torch.inference_mode()
def layer_outputs(model: nn.Module, pixels: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Every layer's output for uint8 digits (N, 28, 28), normalised as in training, float32 on the CPU.

    CNN: conv1 (N, 10, 12, 12) and conv2 (N, 20, 4, 4), each after pooling and ReLU, and logits (N, 10);
    FCNN: hidden (N, hidden) after ReLU, and logits. The same forward pass that predict() runs."""
    model.eval()
    device = next(model.parameters()).device
    batches = [
        model.layers(normalize(pixels[i : i + batch_size].to(device)).contiguous(memory_format=MEMORY_FORMAT))
        for i in range(0, max(len(pixels), 1), batch_size)
    ]
    return {name: torch.cat([b[name].float().cpu() for b in batches]).contiguous() for name in batches[0]}


# What the answer rests on, by occlusion: a WINDOW x WINDOW patch of the digit is set to paper (0) at every
# STRIDE pixels, and the drop in the chosen digit's logit is shared among the patch's pixels. A 4-pixel patch
# is about a stroke and a half wide, so covering it can remove a stroke; stride 2 gives 13 x 13 = 169 patches.
OCCLUSION_WINDOW = 4
OCCLUSION_STRIDE = 2


@torch.inference_mode()
def occlusion(
    model: nn.Module, digit: torch.Tensor, target: int, window: int = OCCLUSION_WINDOW, stride: int = OCCLUSION_STRIDE
) -> torch.Tensor:
    """How much each pixel of a uint8 digit (28, 28) raised (+) or lowered (-) the logit of `target`: float (28, 28).

    Computed in pixel space, on [0, 1] pixels where 0 is paper (the exported graph's input), as Captum's
    Occlusion computes it with baselines=0: for each pixel, the mean over the patches that cover it of
    logit(digit) - logit(digit with the patch set to 0)."""
    if (28 - window) % stride:
        raise ValueError(f"patches of {window} at stride {stride} do not cover the 28 pixels evenly")
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, 28 - window + 1, stride)
    masks = torch.zeros(len(starts) ** 2, 28, 28)
    for k, (top, left) in enumerate((top, left) for top in starts for left in starts):
        masks[k, top : top + window, left : left + window] = 1
    pixels = digit.float().reshape(1, 28, 28) / 255
    batch = torch.cat([pixels, pixels * (1 - masks)])  # the digit, then each patch covered
    inputs = ((batch.unsqueeze(1) - MNIST_MEAN) / MNIST_STD).to(device).contiguous(memory_format=MEMORY_FORMAT)
    scores = model(inputs)[:, target].float().cpu()
    drops = scores[0] - scores[1:]
    return (drops[:, None, None] * masks).sum(0) / masks.sum(0)


def predict(model: nn.Module, images, batch_size: int = 500, prepare: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify digits. Returns (classes (N,), probabilities (N, 10)) on the CPU.

    With prepare (the default), each image goes through digits.prepare_digit first, as MNIST's digits
    were made: of any size, grey or colour, dark ink on paper or light on dark. `images` is one image
    (a file path, a PIL image, or an array or tensor of shape (H, W) or (H, W, C)), a list of them, or a
    batch of shape (N, H, W), (N, 1, H, W), (N, H, W, C) or (N, C, H, W), where C is 3 or 4 (RGB, RGBA).
    Any other shape is refused with a ValueError, among them (3, H, W) and (4, H, W): that could be 3 grey
    images or one colour image with its channels first, so pass (3, 1, H, W) for the one, (H, W, 3) for the other.
    With prepare=False they must already be 28x28 MNIST digits, light on dark (uint8, or floats in [0, 1]),
    of shape (28, 28), (N, 28, 28) or (N, 1, 28, 28), and are used as they are.
    """
    if prepare:
        images = [prepare_digit(image) for image in _one_by_one(images)]
    probs = F.softmax(model_logits(model, _as_uint8_batch(images), batch_size), dim=1).cpu()
    return probs.argmax(dim=1), probs


COLOUR = (3, 4)  # RGB or RGBA channels


def _one_by_one(images) -> list:
    """The single images in `images`, each (H, W) or (H, W, C): see predict() for the shapes it takes."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        return [images]  # a path, a PIL image or bytes: one image
    shape = images.shape
    if images.ndim == 2 or (images.ndim == 3 and shape[-1] in COLOUR):
        return [images]
    if images.ndim == 3 and shape[0] in COLOUR:
        raise ValueError(
            f"predict() cannot tell whether shape {shape} is {shape[0]} grey images or one colour image "
            f"with its channels first; pass ({shape[0]}, 1, H, W) for the one, (H, W, {shape[0]}) for the other"
        )
    if images.ndim == 3:
        return list(images)  # (N, H, W)
    if images.ndim == 4 and shape[1] == 1:
        return list(images[:, 0])  # (N, 1, H, W)
    if images.ndim == 4 and shape[-1] in COLOUR:
        return list(images)  # (N, H, W, C)
    if images.ndim == 4 and shape[1] in COLOUR:
        return list(images.transpose(0, 2, 3, 1))  # (N, C, H, W), as torchvision batches colour images
    raise ValueError(
        f"predict() takes one image (H, W) or (H, W, C), a list of images, or a batch (N, H, W), "
        f"(N, 1, H, W), (N, H, W, C) or (N, C, H, W) with C = 3 or 4; not shape {shape}"
    )
