"""Forward throughput and peak memory: Dinov2HFModel vs transformers' Dinov2Model, identical weights.

    python scripts/bench_model.py --out bench_model.json                # CPU, fp32, ViT-S/14 and ViT-B/14
    python scripts/bench_model.py --device cuda --out bench_gpu.json    # bf16, eager and torch.compile

Both models are built from the same random weights (ours converted to stock transformers), run in
eval mode with SDPA attention at 224 px (released 518 px position grid, so both interpolate).
On CPU the two models' forwards alternate (drift hits both alike); memory is the peak held by
PyTorch's allocator during one forward. On CUDA it
also times one SSL training step (student fwd+bwd on 2x224 + 8x98 crops) three ways: one
transformers pass per crop size, our per-size passes, and our packed pass.
Prints one JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_pair(preset: str, dtype: torch.dtype, device: str):
    from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
    from dinov2_hf.modeling.convert_transformers import to_transformers

    torch.manual_seed(0)
    ours = Dinov2HFModel(Dinov2HFConfig.from_preset(preset, layerscale_value=1.0)).eval()
    reference = to_transformers(ours)
    return ours.to(device, dtype), reference.to(device, dtype)


def cpu_peak_allocated(fn) -> int:
    """Peak bytes held by PyTorch's CPU allocator during ``fn()``, from the profiler's memory events.

    Deterministic, unlike resident memory, which depends on when malloc returns pages to the system.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    events = sorted((e for e in profile.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def cuda_timed(fn, iters: int, warmup: int) -> list[float]:
    """Seconds per call, measured with CUDA events after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def cuda_forward_case(impl: str, preset: str, batch: int, iters: int, compiled: bool) -> dict:
    """bf16 inference throughput and peak memory of one model on CUDA."""
    ours, reference = build_pair(preset, torch.bfloat16, "cuda")
    model = ours if impl == "ours" else reference
    ours = reference = None  # keep only the measured model alive
    if compiled:
        model = torch.compile(model)
    pixel_values = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def run():
        with torch.inference_mode():
            model(pixel_values)

    median = statistics.median(cuda_timed(run, iters, warmup=5))
    return {
        "impl": impl,
        "model": preset,
        "device": "cuda",
        "dtype": "bfloat16",
        "compiled": compiled,
        "batch": batch,
        "median_s": round(median, 5),
        "img_per_s": round(batch / median, 1),
        "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def interleaved_cpu_case(preset: str, batch: int, rounds: int, threads: int) -> list[dict]:
    """Alternate ours / transformers forwards so that machine drift hits both alike; median per model."""
    torch.set_num_threads(threads)
    ours, reference = build_pair(preset, torch.float32, "cpu")
    models = {"transformers": reference, "ours": ours}
    pixel_values = torch.randn(batch, 3, 224, 224)
    times = {name: [] for name in models}
    peaks = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up, and the peak memory of one forward
            model(pixel_values)
            peaks[name] = cpu_peak_allocated(lambda model=model: model(pixel_values))
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(pixel_values)
                times[name].append(time.perf_counter() - start)
    results = []
    for name in models:
        median = statistics.median(times[name])
        results.append(
            {
                "impl": name,
                "model": preset,
                "device": "cpu",
                "dtype": "float32",
                "compiled": False,
                "batch": batch,
                "rounds": rounds,
                "median_s": round(median, 5),
                "img_per_s": round(batch / median, 2),
                "peak_mem_mib": round(peaks[name] / 2**20, 1),
            }
        )
    return results


def ssl_step_cases(preset: str, batch: int, iters: int, warmup: int, compiled: bool) -> list[dict]:
    """One student fwd+bwd over 2 global (224) + 8 local (98) crops per image, bf16 autocast.

    Compiled: transformers' model as a whole with static shapes (one graph per crop size), ours
    block by block (the same compiled block serves the per-size and the packed layouts).
    """
    ours, reference = build_pair(preset, torch.float32, "cuda")
    ours.train()
    reference.train()
    if compiled:
        reference.compile(dynamic=False)
        for layer in ours.encoder.layer:
            layer.compile(dynamic=False)
    global_crops = torch.randn(2 * batch, 3, 224, 224, device="cuda")
    local_crops = torch.randn(8 * batch, 3, 98, 98, device="cuda")
    masks = torch.rand(2 * batch, 256, device="cuda") < 0.3

    def separate(model):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(global_crops, bool_masked_pos=masks).last_hidden_state.float().mean()
                loss = loss + model(local_crops).last_hidden_state.float().mean()
            loss.backward()

        return step

    def packed(model):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outputs = model.forward_packed([global_crops, local_crops], [masks, None])
                loss = sum(o.last_hidden_state.float().mean() for o in outputs)
            loss.backward()

        return step

    cases = [("transformers", "per-size", separate(reference)), ("ours", "per-size", separate(ours)), ("ours", "packed", packed(ours))]
    results = []
    for impl, mode, step in cases:
        row = {"case": "ssl_step", "impl": impl, "mode": mode, "model": preset, "compiled": compiled, "images": batch}
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            median = statistics.median(cuda_timed(step, iters, warmup))
            row.update(
                median_s=round(median, 5),
                img_per_s=round(batch / median, 1),
                peak_mem_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
            )
        except Exception as error:  # report, do not hide: a compile failure is a finding
            row["error"] = repr(error)[:500]
        results.append(row)
    return results


def speedups(results: list[dict], presets: list[str]) -> dict:
    """Median img/s of ours over transformers' for each model, eager and compiled forward."""
    summary = {}
    for preset in presets:
        for compiled in (False, True):
            rows = [r for r in results if r.get("model") == preset and r.get("compiled") == compiled and "case" not in r and "img_per_s" in r]
            ours = [r["img_per_s"] for r in rows if r["impl"] == "ours"]
            theirs = [r["img_per_s"] for r in rows if r["impl"] == "transformers"]
            if ours and theirs:
                key = f"{preset}{'_compiled' if compiled else ''}_speedup_vs_transformers"
                summary[key] = round(statistics.median(ours) / statistics.median(theirs), 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["vits14", "vitb14"])
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds: default 10 on CPU, 30 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per case")
    parser.add_argument("--ssl-batch", type=int, default=64, help="CUDA: images per SSL training step")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile cases")
    parser.add_argument("--ssl-compile-models", nargs="*", default=["vits14"], help="CUDA: models for compiled SSL steps")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    results: list[dict] = []

    def document() -> dict:
        return {
            "benchmark": "bench_model",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
            "threads": args.threads if args.device == "cpu" else None,
            "results": results,
            "summary": speedups(results, args.models),
        }

    def record(rows: list[dict]) -> None:
        """Keep results, and rewrite --out after each case so that a cut-off run still reports."""
        results.extend(rows)
        if args.out:
            args.out.write_text(json.dumps(document(), indent=2))

    if args.device == "cpu":
        batch, rounds = args.batch or 16, args.iters or 10
        for preset in args.models:
            record(interleaved_cpu_case(preset, batch, rounds, args.threads))
    else:
        batch, iters = args.batch or 256, args.iters or 30
        for compiled in [False] + ([] if args.no_compile else [True]):
            for preset in args.models:
                for impl in ("transformers", "ours"):
                    try:
                        record([cuda_forward_case(impl, preset, batch, iters, compiled)])
                    except Exception as error:
                        record([{"impl": impl, "model": preset, "compiled": compiled, "error": repr(error)[:500]}])
                    torch.cuda.empty_cache()
        ssl_runs = [(preset, False) for preset in args.models]
        ssl_runs += [] if args.no_compile else [(preset, True) for preset in args.ssl_compile_models]
        for preset, compiled in ssl_runs:
            try:
                record(ssl_step_cases(preset, args.ssl_batch, max(iters // 3, 5), 3, compiled))
            except Exception as error:
                record([{"case": "ssl_step", "model": preset, "compiled": compiled, "error": repr(error)[:500]}])
            torch.cuda.empty_cache()

    print(json.dumps(document(), indent=2))


if __name__ == "__main__":
    main()
