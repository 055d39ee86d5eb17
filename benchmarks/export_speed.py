"""The exported ONNX model in onnxruntime against the same model in torch eager, on this CPU, in one run. By hand:

    python benchmarks/export_speed.py                                  # the latest run's best.pt
    python benchmarks/export_speed.py --checkpoint runs/cnn/best.pt --repeats 7

Both run the graph export.py writes (pixels in [0, 1] -> normalisation -> model -> logits), on the same
random pixels: latency at batch 1 (the time of one call, as a service answering one image sees it) and
throughput at batch 1000. Each repeat times both engines back to back, so load from other processes hits
both alike; the figures are medians over the repeats. Speed does not depend on the weights' values.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime
import torch

from benchmarks.speed import cpu_name
from config import Config
from export import Exported, export_onnx
from model import load_checkpoint
from rundir import latest_checkpoint


def per_call(fn, pixels, calls: int) -> float:
    """Seconds per call of fn(pixels), over `calls` calls after a few warm-up ones."""
    for _ in range(3):
        fn(pixels)
    start = time.perf_counter()
    for _ in range(calls):
        fn(pixels)
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a best.pt (default: the latest run's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measurement; medians are printed")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for both engines (default: torch's default, all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ckpt = load_checkpoint(args.checkpoint or latest_checkpoint(Config().out_dir))
    wrapped = Exported(model, ckpt["normalization"]["mean"], ckpt["normalization"]["std"]).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same number of threads as torch
    session = onnxruntime.InferenceSession(export_onnx(wrapped, {}), options, providers=["CPUExecutionProvider"])

    def run_torch(pixels):
        with torch.inference_mode():
            return wrapped(torch.from_numpy(pixels))

    def run_onnx(pixels):
        return session.run(["logits"], {"pixels": pixels})[0]

    engines = {"torch eager": run_torch, "onnxruntime": run_onnx}
    generator = torch.Generator().manual_seed(0)
    one, thousand = (torch.rand(n, 1, 28, 28, generator=generator).numpy() for n in (1, 1000))
    latency = {name: [] for name in engines}
    throughput = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, fn in engines.items():
            latency[name].append(per_call(fn, one, calls=500))
            throughput[name].append(1000 / per_call(fn, thousand, calls=20))

    print(
        f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; medians of {args.repeats} repeats"
    )
    print(f"{'':<24}{'torch eager':>14}{'onnxruntime':>14}{'onnxruntime / torch':>22}")
    lat = {name: statistics.median(values) for name, values in latency.items()}
    thr = {name: statistics.median(values) for name, values in throughput.items()}
    print(
        f"{'latency, batch 1':<24}{lat['torch eager'] * 1e3:>11.3f} ms{lat['onnxruntime'] * 1e3:>11.3f} ms"
        f"{lat['torch eager'] / lat['onnxruntime']:>18.2f}x faster"
    )
    print(
        f"{'throughput, batch 1000':<24}{thr['torch eager']:>9,.0f} img/s{thr['onnxruntime']:>9,.0f} img/s"
        f"{thr['onnxruntime'] / thr['torch eager']:>18.2f}x faster"
    )


if __name__ == "__main__":
    main()
