"""Export a checkpoint to files that run without this project: ONNX (onnxruntime, browsers, C++) and torch.export's .pt2.

    python export.py                                      # the latest run's best.pt -> best.onnx and best.pt2 beside it
    python export.py runs/cnn/best.pt --format onnx --out model.onnx
    python export.py --format web                         # a static site beside it, web/: the page runs the ONNX model

The exported graph takes what a user has and gives what the model gives:
    input  "pixels": float32 (N, 1, 28, 28) in [0, 1], a white digit on black, as torchvision's ToTensor gives
    output "logits": float32 (N, 10), one per digit 0-9; softmax gives the probabilities
The normalisation is inside the graph and N is free. Before a file is written, it is run on the MNIST test
set (or on a fixed batch of printed digits when the data is not there) and its logits are compared with the
checkpoint's; a file that disagrees is not written.

--format web writes a folder that any static server can serve: the demo's page (static/), with
static/browser/'s classify.js in place of the server's, the verified ONNX file as model.onnx, and
onnxruntime-web's WebAssembly backend from node_modules/ (`npm ci` installs it, pinned by package-lock.json).
"""

import hashlib
import importlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from config import Config, Parser, UserError, exit_script
from data import MNIST_MEAN, MNIST_STD, RAW_FILES, find_files, load_split
from model import MEMORY_FORMAT, load_checkpoint, model_logits
from rundir import atomic_write, describe_checkpoint, find_checkpoint

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
# The largest |logit difference| from the checkpoint that counts as the same model. Float32 sums in another
# order (onnxruntime's kernels; (x - mean) / std on [0, 1] pixels instead of on 0-255) differ by up to 1e-5 on MNIST.
TOLERANCE = 1e-4
OPSET = 18  # what torch's dynamo exporter targets by default; every onnxruntime since 1.14 runs it
NEEDS = {"onnx": ("onnxscript", "onnx", "onnxruntime"), "pt2": ()}  # packages beyond torch, by format
INPUT = "pixels: float32 (N, 1, 28, 28) in [0, 1], a white digit on black, as torchvision's ToTensor gives"
OUTPUT = "logits: float32 (N, 10), one per digit 0-9; softmax gives the probabilities"

ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"
ORT_WEB = ROOT / "node_modules" / "onnxruntime-web"
# The static site: every file the page loads, and nothing else. The page is the demo's (static/); classify.js
# comes from static/browser/, where the answers come from the model in the browser instead of POST /predict.
# Of onnxruntime-web only the WebAssembly backend: ort.wasm.min.js loads the .mjs, which loads the .wasm
# (the WebGPU/JSEP, JSPI and asyncify builds are as large again each, and the page never asks for them).
SITE = {
    "index.html": STATIC / "index.html",
    "demo.css": STATIC / "demo.css",
    "demo.js": STATIC / "demo.js",
    "classify.js": STATIC / "browser" / "classify.js",
    "worker.js": STATIC / "browser" / "worker.js",
    "prepare.js": STATIC / "browser" / "prepare.js",
    "ort.wasm.min.js": ORT_WEB / "dist" / "ort.wasm.min.js",
    "ort-wasm-simd-threaded.mjs": ORT_WEB / "dist" / "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm": ORT_WEB / "dist" / "ort-wasm-simd-threaded.wasm",
}
MODEL_FILE = "model.onnx"  # the one file of the site that export.py makes rather than copies


class Exported(nn.Module):
    """A trained model with its normalisation in front: pixels in [0, 1] (N, 1, 28, 28) -> logits (N, 10)."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, pixels):
        return self.model(((pixels - self.mean) / self.std).contiguous(memory_format=MEMORY_FORMAT))


def require(fmt: str) -> None:
    """Import what exporting `fmt` needs, or say which package is missing and how to install it."""
    if fmt == "web":
        missing = [name for name, source in SITE.items() if not source.is_file()]
        if missing:
            raise UserError(
                f"exporting to web needs onnxruntime-web in {ORT_WEB} (no {missing[0]}): run `npm ci` in {ROOT} "
                "(npm comes with Node.js: apt-get install nodejs npm)"
            )
        fmt = "onnx"
    for name in NEEDS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(
                f"exporting to {fmt} needs the {name} package: pip install {name} (or pip install -r requirements.txt)"
            ) from None


def metadata(path: Path, ckpt: dict, mean: float, std: float) -> dict[str, str]:
    """What a user of the file needs to know, as strings: ONNX metadata_props and the .pt2's metadata.json."""
    test_acc = ckpt.get("test_acc")
    return {
        "input": INPUT,
        "output": OUTPUT,
        "normalization": f"inside the graph: (pixels - {mean}) / {std}",
        "normalization_mean": str(mean),
        "normalization_std": str(std),
        "model": ckpt["model_name"],
        "test_accuracy": "unknown" if test_acc is None else f"{test_acc:.4f}",
        "checkpoint": path.name,
        "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
    }


def export_onnx(wrapped: nn.Module, meta: dict[str, str]) -> bytes:
    """The ONNX file's bytes, from torch.onnx's dynamo exporter, with a free batch size and `meta` attached."""
    example = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        verbose=False,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
    )
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{INPUT}\n{OUTPUT}"
    return proto.SerializeToString()


def export_pt2(wrapped: nn.Module, meta: dict[str, str]) -> bytes:
    """The .pt2 file's bytes, from torch.export, with a free batch size and `meta` as metadata.json inside."""
    program = torch.export.export(
        wrapped, (torch.rand(2, 1, 28, 28),), dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}}
    )
    buffer = io.BytesIO()
    with (
        warnings.catch_warnings()
    ):  # "No complete tensor found in the group": about weights off the CPU; ours are on it
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(program, buffer, extra_files={"metadata.json": json.dumps(meta, indent=1)})
    return buffer.getvalue()


def run_onnx(data: bytes, pixels: np.ndarray) -> torch.Tensor:
    """Logits of the ONNX file `data` on float pixels (N, 1, 28, 28), by onnxruntime, as a user would run it."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixels": pixels})[0])


def run_pt2(data: bytes, pixels: np.ndarray) -> torch.Tensor:
    """Logits of the .pt2 file `data` on float pixels (N, 1, 28, 28), through torch.export.load."""
    with torch.inference_mode():
        return torch.export.load(io.BytesIO(data)).module()(torch.from_numpy(pixels))


RUN = {"onnx": run_onnx, "pt2": run_pt2}
EXPORT = {"onnx": export_onnx, "pt2": export_pt2}


def printed_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of labelled digits for when MNIST is not there: 0-9 in PIL's font at four sizes, made MNIST-like."""
    from PIL import Image, ImageDraw, ImageFont

    from digits import prepare_digit

    images, labels = [], []
    for size in (20, 28, 36, 44):
        font = ImageFont.load_default(size=size)
        for digit in range(10):
            canvas = Image.new("L", (size * 2, size * 2))
            ImageDraw.Draw(canvas).text((size // 2, size // 4), str(digit), fill=255, font=font)
            images.append(prepare_digit(canvas))
            labels.append(digit)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def test_images(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 digits (N, 28, 28), labels and their name: the MNIST test set if it is in data_dir, else printed digits.

    The set is found as training finds it (data.find_files: MNIST/raw/ or the folder itself, plain or .gz)."""
    files, _ = find_files(Path(data_dir))
    if files is not None:
        images, labels = load_split(data_dir, train=False, download=False)  # a damaged file is an error, not a fallback
        return images, labels, f"the MNIST test set in {files[RAW_FILES['test'][0]].parent}"
    images, labels = printed_digits()
    return images, labels, f"{len(labels)} printed digits (no MNIST test set in {data_dir}; pass --data-dir to use it)"


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def out_paths(checkpoint: Path, out: Path | None, formats: list[str]) -> dict[str, Path]:
    """Where each format goes: beside the checkpoint by default; with --out and both formats, out's suffix changes."""
    if out is None:
        return {fmt: checkpoint.with_suffix(FORMATS[fmt]) for fmt in formats}
    if len(formats) == 1:
        return {formats[0]: out}
    return {fmt: out.with_suffix(FORMATS[fmt]) for fmt in formats}


def check_writable(path: Path, checkpoint: Path) -> None:
    """Fail now, before the export's seconds, if `path` cannot be written (atomic_write would say so only at the end)."""
    if path.resolve() == checkpoint.resolve():
        raise UserError(f"--out {path} would overwrite the checkpoint; pass another file name")
    if path.is_dir():
        raise UserError(
            f"cannot write {path}: it is a folder; pass --out with a file name such as {path / 'best.onnx'}"
        )
    probe = path.with_name(f".{path.name}.tmp")
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); pass --out with a path in a writable folder") from None


def check_site_folder(folder: Path, checkpoint: Path) -> None:
    """Fail now if the site cannot go to `folder`: a file is there, a folder other than an earlier site
    (whose files export.py would delete), or one whose parent cannot be written."""
    if folder.is_file():
        raise UserError(f"cannot write the site to {folder}: it is a file; pass --out with a folder name")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MODEL_FILE).is_file():
        raise UserError(
            f"{folder} is a folder that holds something other than an earlier web export, and the export would "
            "replace it; pass --out with a new or empty folder"
        )
    if checkpoint.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--out {folder} holds the checkpoint, and the export would replace it; pass another folder")
    try:
        tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.").cleanup()
    except OSError as e:
        raise UserError(f"cannot write {folder} ({e.strerror}); pass --out with a folder in a writable place") from None


def write_site(folder: Path, model: bytes) -> int:
    """Write the static site to `folder` and return its size in bytes. It is built in a temporary folder beside
    `folder` and renamed into place, so a failure leaves the earlier site (or nothing), never half of one."""
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = None
    try:
        for name, source in SITE.items():
            shutil.copyfile(source, building / name)
        (building / MODEL_FILE).write_bytes(model)
        building.chmod(0o755)  # mkdtemp's 0o700 would hide the site from a web server running as another user
        if folder.exists():
            old = folder.rename(building.with_name(f"{building.name}.old"))
        building.rename(folder)
    except OSError as e:
        if old is not None and not folder.exists():
            old.rename(folder)
        raise UserError(f"could not write {folder}: {e.strerror or e}; nothing there has changed") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
        if old is not None and folder.exists():
            shutil.rmtree(old, ignore_errors=True)
    return sum(f.stat().st_size for f in folder.iterdir())


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "checkpoint",
        nargs="?",
        type=Path,
        help="a best.pt or last.pt, a run folder, or a run name in runs/ (default: the latest run's best.pt)",
    )
    parser.add_argument(
        "--format",
        choices=(*FORMATS, "all", "web"),
        default="all",
        help="what to write (default: all, which is onnx and pt2); web: a static site that runs the model in the browser",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the file to write (default: beside the checkpoint, best.onnx and "
        "best.pt2); with --format all its suffix becomes .onnx and .pt2; with --format web, the folder "
        "(default: web/ beside the checkpoint)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder holding the MNIST files to verify on (in MNIST/raw/ or in itself, plain or .gz); never "
        "downloads (default: the checkpoint's data_dir, else config.py's)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        web = args.format == "web"
        formats = list(FORMATS) if args.format == "all" else ["onnx"] if web else [args.format]
        for fmt in ["web"] if web else formats:
            require(fmt)
        checkpoint = find_checkpoint(args.checkpoint, Config().out_dir)
        model, ckpt = load_checkpoint(checkpoint)
        if web:
            site = args.out or checkpoint.parent / "web"
            check_site_folder(site, checkpoint)
            paths = {"onnx": site / MODEL_FILE}
        else:
            paths = out_paths(checkpoint, args.out, formats)
            for path in paths.values():
                check_writable(path, checkpoint)
        norm = ckpt.get("normalization", {"mean": MNIST_MEAN, "std": MNIST_STD})
        wrapped = Exported(model, norm["mean"], norm["std"]).eval()
        meta = metadata(checkpoint, ckpt, norm["mean"], norm["std"])
        images, labels, source = test_images(
            args.data_dir or ckpt.get("config", {}).get("data_dir") or Config().data_dir
        )
        reference = model_logits(model, images)  # the checkpoint as the project runs it: uint8 pixels, normalize()
        pixels = (images.unsqueeze(1).float() / 255).numpy()  # what ToTensor gives
        print(describe_checkpoint(checkpoint, ckpt), file=sys.stderr, flush=True)
        print(f"checkpoint: {checkpoint} ({ckpt['model_name']}, sha256 {meta['checkpoint_sha256'][:12]}...)")
        print(f"verifying on {source}: checkpoint accuracy {accuracy(reference, labels):.2%}")
        for fmt, path in paths.items():
            data = EXPORT[fmt](wrapped, meta)
            logits = RUN[fmt](data, pixels)
            difference = (logits - reference).abs().max().item()
            print(
                f"{fmt:<5} max |logit difference| {difference:.1e} (tolerance {TOLERANCE:.0e}), "
                f"accuracy {accuracy(logits, labels):.2%}"
            )
            if not difference <= TOLERANCE:  # also catches NaN
                raise UserError(
                    f"the exported {fmt} model's logits differ from the checkpoint's by {difference:.2e}, "
                    f"more than {TOLERANCE:.0e}; {path} was not written"
                )
            if web:
                size = write_site(site, data)
                print(
                    f"wrote {site}/ ({len(SITE) + 1} files, {size / 1e6:.1f} MB): the page runs the model in the browser"
                )
                print(f"serve it with `python -m http.server -d {site}` and open http://127.0.0.1:8000")
                continue
            atomic_write(path, data)  # only a verified file is written, and never half of one
            print(f"wrote {path} ({len(data) / 1e3:.0f} kB)")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_script(main())
