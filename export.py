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
Its model.onnx also outputs every layer beside logits (conv1 and conv2, or the FCNN's hidden layer; LAYERS below),
checked like the logits, and inside.json holds what the page's views of the network need beside them: conv1's
filters and the occlusion's patch. It writes into the folder and records its files in a manifest there
(.web-export.json, as pip's RECORD does): a later export replaces those files and no others, so a .git, a CNAME
or a README beside them stays.
"""

import hashlib
import importlib
import io
import json
import os
import secrets
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
from model import MEMORY_FORMAT, OCCLUSION_STRIDE, OCCLUSION_WINDOW, layer_outputs, load_checkpoint, model_logits
from rundir import RUN_FILES, atomic_write, describe_checkpoint, find_checkpoint

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
# The largest |logit difference| from the checkpoint that counts as the same model. Float32 sums in another
# order (onnxruntime's kernels; (x - mean) / std on [0, 1] pixels instead of on 0-255) differ by up to 1e-5 on MNIST.
TOLERANCE = 1e-4
OPSET = 18  # what torch's dynamo exporter targets by default; every onnxruntime since 1.14 runs it
NEEDS = {"onnx": ("onnxscript", "onnx", "onnxruntime"), "pt2": ()}  # packages beyond torch, by format
INPUT = "pixels: float32 (N, 1, 28, 28) in [0, 1], a white digit on black, as torchvision's ToTensor gives"
OUTPUT = "logits: float32 (N, 10), one per digit 0-9; softmax gives the probabilities"
# The web export's model.onnx gives every layer beside the logits, for the page's views of the network; the files
# of --format onnx and pt2 keep the one output above. Each layer is taken after pooling and ReLU.
LAYERS = {
    "conv1": "conv1: float32 (N, 10, 12, 12), the first conv layer's maps after max-pooling and ReLU",
    "conv2": "conv2: float32 (N, 20, 4, 4), the second conv layer's maps after max-pooling and ReLU",
    "hidden": "hidden: float32 (N, hidden), the FCNN's hidden layer after ReLU",
}

ROOT = Path(__file__).resolve().parent
STATIC = ROOT / "static"
ORT_WEB = ROOT / "node_modules" / "onnxruntime-web"
# The static site: every file the page loads, and nothing else. The page is the demo's (static/); classify.js
# comes from static/browser/, where the answers come from the model in the browser instead of POST /predict.
# Of onnxruntime-web only the WebAssembly backend: ort.wasm.min.js loads the glue module, which loads the .wasm
# (the WebGPU/JSEP, JSPI and asyncify builds are as large again each, and the page never asks for them). The glue
# module ships as .js, not .mjs: nginx's stock mime.types (Debian's 1.22, upstream's too) has no .mjs, so it would
# be sent as application/octet-stream, and browsers run no module of that type. worker.js names it for onnxruntime.
SITE = {
    "index.html": STATIC / "index.html",
    "demo.css": STATIC / "demo.css",
    "demo.js": STATIC / "demo.js",
    "classify.js": STATIC / "browser" / "classify.js",
    "worker.js": STATIC / "browser" / "worker.js",
    "prepare.js": STATIC / "browser" / "prepare.js",
    "ort.wasm.min.js": ORT_WEB / "dist" / "ort.wasm.min.js",
    "ort-wasm-simd-threaded.js": ORT_WEB / "dist" / "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm": ORT_WEB / "dist" / "ort-wasm-simd-threaded.wasm",
}
MODEL_FILE = "model.onnx"  # the files of the site that export.py makes rather than copies: the model,
INSIDE_FILE = "inside.json"  # and what the page's views need beside its outputs: conv1's filters, the occlusion's patch
# The files an export wrote into its folder, by name, with their sha256: only these does a later export replace
# or remove. While an export is under way it also names the export's staging folder and the files it will write.
MANIFEST = ".web-export.json"
STAGING = ".web-export."  # the prefix of that staging folder, made inside the site's folder
# A site that export.py wrote before it kept a manifest is recognised only as exactly these files, nothing beside
# them, with export.py's own model.onnx among them (its bytes hold INPUT and a checkpoint_sha256, see metadata()).
# Any other folder without a manifest is taken as the user's: a site file's name in it is refused, not replaced.
LEGACY_SITE = {
    *("index.html", "demo.css", "demo.js", "classify.js", "worker.js", "prepare.js", "model.onnx"),
    *("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
}


class Exported(nn.Module):
    """A trained model with its normalisation in front: pixels in [0, 1] (N, 1, 28, 28) -> logits (N, 10), or with
    layers, the tuple (logits, *every layer's output), in the order of outputs()."""

    def __init__(self, model: nn.Module, mean: float, std: float, layers: bool = False):
        super().__init__()
        self.model, self.mean, self.std, self.layers = model, mean, std, layers

    def forward(self, pixels):
        x = ((pixels - self.mean) / self.std).contiguous(memory_format=MEMORY_FORMAT)
        if not self.layers:
            return self.model(x)
        layers = self.model.layers(x)
        return tuple(layers[name].contiguous() for name in outputs(self.model))


def outputs(model: nn.Module) -> list[str]:
    """The web export's output names: logits, then the model's layers (conv1 and conv2, or hidden)."""
    return ["logits", *(name for name in LAYERS if hasattr(model, "conv1") == name.startswith("conv"))]


def inside_file(model: nn.Module, ckpt: dict) -> bytes:
    """inside.json, what the page's views need beside the model's outputs: the model kind, the occlusion's patch
    and stride (model.occlusion's), and for the CNN conv1's filters, 10 flat lists of 5x5 weights, row by row."""
    inside = {"model": ckpt["model_name"], "window": OCCLUSION_WINDOW, "stride": OCCLUSION_STRIDE}
    if hasattr(model, "conv1"):
        inside["filters"] = model.conv1.weight.detach().float().cpu().reshape(10, 25).tolist()
    return json.dumps(inside).encode()


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


def export_onnx(wrapped: nn.Module, meta: dict[str, str], names=("logits",)) -> bytes:
    """The ONNX file's bytes, from torch.onnx's dynamo exporter, with outputs `names`, a free batch size and
    `meta` attached."""
    example = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        verbose=False,
        input_names=["pixels"],
        output_names=list(names),
        dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}},
    )
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{INPUT}\n{meta['output']}"
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


def run_onnx(data: bytes, pixels: np.ndarray, names=("logits",)) -> torch.Tensor | dict[str, torch.Tensor]:
    """Logits of the ONNX file `data` on float pixels (N, 1, 28, 28), by onnxruntime, as a user would run it; with
    more `names`, every output so named, by name."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    results = session.run(list(names), {"pixels": pixels})
    if list(names) == ["logits"]:
        return torch.from_numpy(results[0])
    return {name: torch.from_numpy(result) for name, result in zip(names, results)}


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def legacy_files(folder: Path) -> dict[str, str]:
    """The files of a site that export.py wrote before it kept a manifest, with their sha256, if `folder` holds
    exactly LEGACY_SITE, as files, and export.py's model.onnx among them; else {}."""
    if not folder.is_dir() or {p.name for p in folder.iterdir()} != LEGACY_SITE:
        return {}
    if any(path.is_symlink() or not path.is_file() for path in (folder / name for name in LEGACY_SITE)):
        return {}
    model = (folder / MODEL_FILE).read_bytes()  # protobuf keeps metadata()'s strings as plain UTF-8 bytes
    if INPUT.encode() not in model or b"checkpoint_sha256" not in model:
        return {}
    return {name: sha256(folder / name) for name in LEGACY_SITE}


def read_manifest(folder: Path) -> dict:
    """The manifest in `folder`: {"files": {name: sha256}} for the files an earlier export wrote there, and, if an
    export was stopped under way, "pending": {"folder": its staging folder, "files": the files it was writing}.
    Without a manifest: the files of a site from before manifests (legacy_files), else none."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return {"files": legacy_files(folder)}
    try:
        manifest = json.loads(path.read_text())
        pending = manifest.get("pending", {"folder": STAGING, "files": {}})
        tables = (manifest["files"], pending["files"])
        valid = (
            all(isinstance(t, dict) for t in tables)
            and all(isinstance(n, str) and isinstance(h, str) for t in tables for n, h in t.items())
            and all(n and n == Path(n).name and not n.startswith(".") for t in tables for n in t)  # plain names
            and isinstance(pending["folder"], str)
            and pending["folder"].startswith(STAGING)
            and "/" not in pending["folder"]
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise UserError(
            f"{path} is not a manifest that export.py wrote, so it cannot tell which files there are an earlier "
            "export's; remove it and the site's files by hand, or pass --out with another folder"
        )
    return manifest


def check_site_files(folder: Path, manifest: dict) -> dict[str, str]:
    """The sha256 of each file in `folder` that an earlier export wrote, by name. Refuses, naming it, a file there
    that the export would overwrite or remove but that the manifest does not prove an earlier export wrote:
    one it does not list (a user's own index.html), or one changed since."""
    ours: dict[str, set[str]] = {}  # a name may have two hashes after an export was killed while moving files in
    for table in (manifest["files"], manifest.get("pending", {}).get("files", {})):
        for name, digest in table.items():
            ours.setdefault(name, set()).add(digest)
    current = {}
    for name in sorted({*SITE, MODEL_FILE, INSIDE_FILE, *ours}):
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        if name not in ours:
            raise UserError(
                f"{path} is not a file that an earlier export wrote (it is not in {folder / MANIFEST}), and the "
                "export would overwrite it; move it away, or pass --out with another folder"
            )
        if path.is_symlink() or not path.is_file() or (digest := sha256(path)) not in ours[name]:
            raise UserError(
                f"{path} has changed since an earlier export wrote it, and the export would "
                f"{'overwrite' if name in {*SITE, MODEL_FILE, INSIDE_FILE} else 'remove'} it; move it away, or pass --out "
                "with another folder"
            )
        current[name] = digest
    return current


def check_site_folder(folder: Path, checkpoint: Path) -> None:
    """Fail now, before the export's seconds, if the site cannot go to `folder`: it is a file or a broken link, it
    holds the checkpoint or a run folder, a file there that the export would replace is not an earlier export's
    (check_site_files), or it cannot be written."""
    if folder.is_file():
        raise UserError(f"cannot write the site to {folder}: it is a file; pass --out with a folder name")
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"cannot write the site to {folder}: it is a link to a folder that does not exist; make it")
    if checkpoint.resolve().is_relative_to(folder.resolve()):
        raise UserError(
            f"--out {folder} holds the checkpoint, which would be published with the site; pass another folder, "
            f"such as {checkpoint.parent / 'web'}"
        )
    below = [path for path in folder.iterdir() if path.is_dir()] if folder.is_dir() else []
    run = next((d for d in (folder, *below) if any((d / name).exists() for name in RUN_FILES)), None)
    if run is not None:
        raise UserError(
            f"--out {folder} holds a run folder ({run}), which would be published with the site; pass another "
            f"folder, such as {checkpoint.parent / 'web'}"
        )
    if folder.is_dir():
        check_site_files(folder, read_manifest(folder))
    try:
        tempfile.TemporaryDirectory(dir=folder if folder.is_dir() else folder.parent, prefix=STAGING).cleanup()
    except OSError as e:
        raise UserError(f"cannot write {folder} ({e.strerror}); pass --out with a folder in a writable place") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(
        folder / MANIFEST, json.dumps({"written_by": "python export.py --format web", **manifest}, indent=1).encode()
    )


def write_site(folder: Path, model: bytes, extra: dict[str, bytes] | None = None) -> int:
    """Write the static site into `folder` (made if it is not there) and return the size of its files in bytes:
    SITE's files, `model` as MODEL_FILE, and the other files export.py made, `extra` (INSIDE_FILE), by name.

    Only files that the folder's manifest proves an earlier export wrote are replaced or removed (check_site_files):
    a .git, a CNAME or a README beside them stays. The new files are staged in a folder inside `folder`, read back
    and checked, then renamed into place one by one, and the manifest is rewritten last. A failure puts the earlier
    files back: the earlier site, whole. A kill -9 while staging leaves the earlier site whole, and the staging
    folder, named in the manifest for the next export to remove; a kill while renaming (milliseconds) leaves some
    files of each site, each whole and each listed in the manifest, so that the next export replaces them all."""
    made = not folder.exists()
    try:
        contents = {name: source.read_bytes() for name, source in SITE.items()} | {MODEL_FILE: model} | (extra or {})
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"could not write {folder}: {e.strerror or e}; nothing there has changed") from None
    manifest = read_manifest(folder)
    current = check_site_files(folder, manifest)
    if "pending" in manifest:  # an export killed under way: its staging folder is named, so it is ours to remove
        shutil.rmtree(folder / manifest["pending"]["folder"], ignore_errors=True)
    before = (folder / MANIFEST).read_bytes() if (folder / MANIFEST).exists() else None
    new = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    staging = folder / f"{STAGING}{secrets.token_hex(4)}"
    write_manifest(folder, {"files": current, "pending": {"folder": staging.name, "files": new}})
    moved, placed = [], []  # the earlier files moved into staging/old, the new ones moved into place
    try:
        (staging / "new").mkdir(parents=True)
        (staging / "old").mkdir()
        for name, data in contents.items():
            with open(staging / "new" / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, digest in new.items():
            if sha256(staging / "new" / name) != digest:
                raise OSError(f"{name} read back differs from what was written")
        for name in sorted({*current, *new}):
            if name in current:
                os.replace(folder / name, staging / "old" / name)
                moved.append(name)
            if name in new:
                os.replace(staging / "new" / name, folder / name)
                placed.append(name)
    except OSError as e:
        try:
            for name in reversed(placed):
                os.replace(folder / name, staging / "new" / name)
            for name in reversed(moved):
                os.replace(staging / "old" / name, folder / name)
        except OSError as again:
            raise UserError(
                f"could not write {folder}: {e.strerror or e}, nor put the earlier files back ({again.strerror or again})"
                f"; it holds files of both exports, each listed in {MANIFEST}: export again to replace them all"
            ) from None
        shutil.rmtree(staging, ignore_errors=True)
        if before is not None:
            atomic_write(folder / MANIFEST, before)
        else:
            (folder / MANIFEST).unlink()
            if made:
                folder.rmdir()
        raise UserError(f"could not write {folder}: {e.strerror or e}; nothing there has changed") from None
    shutil.rmtree(staging, ignore_errors=True)  # with the earlier files that the new ones replaced
    write_manifest(folder, {"files": new})
    return sum(len(data) for data in contents.values())


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
        for fmt in ["web"] if web else formats:  # after the checks of what the user gave, which need none of it
            require(fmt)
        norm = ckpt.get("normalization", {"mean": MNIST_MEAN, "std": MNIST_STD})
        wrapped = Exported(model, norm["mean"], norm["std"], layers=web).eval()
        meta = metadata(checkpoint, ckpt, norm["mean"], norm["std"])
        names = outputs(model) if web else ["logits"]
        meta["output"] = "; ".join([OUTPUT, *(LAYERS[name] for name in names[1:])])
        images, labels, source = test_images(
            args.data_dir or ckpt.get("config", {}).get("data_dir") or Config().data_dir
        )
        reference = model_logits(model, images)  # the checkpoint as the project runs it: uint8 pixels, normalize()
        pixels = (images.unsqueeze(1).float() / 255).numpy()  # what ToTensor gives
        print(describe_checkpoint(checkpoint, ckpt), file=sys.stderr, flush=True)
        print(f"checkpoint: {checkpoint} ({ckpt['model_name']}, sha256 {meta['checkpoint_sha256'][:12]}...)")
        print(f"verifying on {source}: checkpoint accuracy {accuracy(reference, labels):.2%}")
        for fmt, path in paths.items():
            if web:  # model.onnx with every layer: the page's views check them against nothing else
                data = export_onnx(wrapped, meta, names)
                layers = run_onnx(data, pixels, names)
                logits = layers.pop("logits")
            else:
                data, layers = EXPORT[fmt](wrapped, meta), {}
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
            if layers:
                expected = layer_outputs(model, images)  # relu(max_pool(conv(x))), as the checkpoint runs it
                for name, output in layers.items():
                    difference = (output - expected[name]).abs().max().item()
                    print(f"{'':<5} max |{name} difference| {difference:.1e} (tolerance {TOLERANCE:.0e})")
                    if not difference <= TOLERANCE:
                        raise UserError(
                            f"the exported model's {name} outputs differ from the checkpoint's by {difference:.2e}, "
                            f"more than {TOLERANCE:.0e}; {site} was not written"
                        )
            if web:
                size = write_site(site, data, {INSIDE_FILE: inside_file(model, ckpt)})
                print(
                    f"wrote {site}/ ({len(SITE) + 2} files, {size / 1e6:.1f} MB, listed in {MANIFEST}): the page "
                    "runs the model in the browser"
                )
                print(f"serve it with `python -m http.server --bind 127.0.0.1 -d {site}`, open http://127.0.0.1:8000")
                continue
            atomic_write(path, data)  # only a verified file is written, and never half of one
            print(f"wrote {path} ({len(data) / 1e3:.0f} kB)")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_script(main())
