"""CPU inference latency and throughput: onnxruntime on our ONNX export vs PyTorch eager, same weights.

    python scripts/bench_onnx.py --out benchmarks/bench_onnx_cpu.json
    python scripts/bench_onnx.py --preset tiny --iters 5        # quick check

A randomly initialised backbone (ViT-S/14 by default, released 518 px position grid, so both
interpolate to the 224 px input) is exported with ``export_onnx`` (fp32, opset 18) and timed with
onnxruntime's CPU provider and with PyTorch eager (SDPA, ``inference_mode``), both on the same
number of threads (1 and all cores by default: on a shared machine PyTorch's OpenMP threads
suffer most from other jobs, so the 1-thread figures are the steadier comparison; OMP_WAIT_POLICY=PASSIVE
helps them). The runtimes take turns in blocks (two rounds), so load drift hits both alike.
Reports the median latency and images/s per batch size, and the max abs difference of their
``last_hidden_state``. Prints one JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(preset: str, batch_sizes: list[int], size: int, iters: int, warmup: int, threads: list[int], rounds: int = 2) -> dict:
    import onnxruntime

    from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
    from dinov2_hf.modeling.onnx import export_onnx

    torch.manual_seed(0)
    model = Dinov2HFModel(Dinov2HFConfig.from_preset(preset, layerscale_value=1.0)).eval()
    cases = []
    with tempfile.TemporaryDirectory() as folder:
        export_seconds = timed(lambda: export_onnx(model, folder))
        for count in threads:
            torch.set_num_threads(count)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = count
            options.inter_op_num_threads = 1
            # Idle onnxruntime workers would otherwise spin and slow the PyTorch block that follows.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])
            cases += bench_session(model, session, batch_sizes, size, iters, warmup, count, rounds)
    return {"export_seconds": round(export_seconds, 1), "cases": cases}


def bench_session(model, session, batch_sizes, size, iters, warmup, threads, rounds) -> list[dict]:
    cases = []
    for batch in batch_sizes:
        pixel_values = torch.randn(batch, 3, size, size)
        feed = {"pixel_values": pixel_values.numpy()}

        def run_torch(pixel_values=pixel_values):
            with torch.inference_mode():
                return model(pixel_values).last_hidden_state

        def run_onnx(feed=feed):
            return session.run(["last_hidden_state"], feed)[0]

        difference = float(abs(run_onnx() - run_torch().numpy()).max())
        torch_times, onnx_times = [], []
        for _ in range(rounds):  # blocks of each runtime in turn: load drift hits both alike
            for fn, times in ((run_torch, torch_times), (run_onnx, onnx_times)):
                for _ in range(warmup):
                    fn()
                times.extend(timed(fn) for _ in range(iters // rounds))
        torch_latency, onnx_latency = statistics.median(torch_times), statistics.median(onnx_times)
        cases.append(
            {
                "threads": threads,
                "batch": batch,
                "torch_eager_latency_ms": round(torch_latency * 1000, 2),
                "onnxruntime_latency_ms": round(onnx_latency * 1000, 2),
                "torch_eager_images_per_s": round(batch / torch_latency, 2),
                "onnxruntime_images_per_s": round(batch / onnx_latency, 2),
                "onnxruntime_speedup": round(torch_latency / onnx_latency, 3),
                "max_abs_difference": difference,
            }
        )
        print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vits14")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1], help="thread counts (each runtime)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import onnxruntime

    result = {
        "benchmark": "bench_onnx",
        "preset": args.preset,
        "image_size": args.size,
        "dtype": "float32",
        "iters": args.iters,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        **bench(args.preset, args.batch_sizes, args.size, args.iters, args.warmup, args.threads),
    }
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
