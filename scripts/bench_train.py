"""Training-step throughput: our DINOv2 step vs a naive step built on stock transformers Dinov2Model.

    python scripts/bench_train.py --out benchmarks/bench_train_cpu.json                 # tiny ViT on CPU
    python scripts/bench_train.py --device cuda --models vits14 vitb14 vitl14 --batch 64 --compile  # on a GPU

Both run the same objective (SSLMetaArch: heads, DINO + iBOT + KoLeo, AdamW, EMA) on the same
batch. "ours": our backbone, one packed student pass over 2 global + 8 local crops, one head pass.
"naive": stock transformers Dinov2Model for student and teacher, one student pass per crop size.
"ours_compiled" (--compile): ours with every block torch.compiled, as ``train.compile=true`` runs it.
On CUDA all use bf16 autocast; MFU counts the backbone matmul FLOPs (6 x params x tokens for
student fwd+bwd, 2 x params x tokens for the teacher) over the GPU's dense bf16 peak (--peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf.data.collate import MultiCropCollator  # noqa: E402
from dinov2_hf.data.transforms import MultiCropSettings  # noqa: E402
from dinov2_hf.modeling.convert_transformers import to_transformers  # noqa: E402
from dinov2_hf.objective import (  # noqa: E402
    DinoSettings,
    IbotSettings,
    ModelSettings,
    SSLConfig,
    SSLMetaArch,
    build_schedules,
    param_groups,
)
from dinov2_hf.objective.step import training_step  # noqa: E402


class StockBackbone(nn.Module):
    """transformers' Dinov2Model behind the two calls the meta-architecture makes."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.config.num_register_tokens = 0

    def forward(self, pixel_values, bool_masked_pos=None):
        return self.model(pixel_values, bool_masked_pos=bool_masked_pos)

    def forward_packed(self, pixel_values, bool_masked_pos):
        return [self.model(x, bool_masked_pos=m) for x, m in zip(pixel_values, bool_masked_pos)]


def make_arch(preset: str, crops: MultiCropSettings, naive: bool, device: str, tiny: bool) -> SSLMetaArch:
    torch.manual_seed(0)
    overrides = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 8} if tiny else {}
    heads = dict(head_n_prototypes=4096, head_hidden_dim=512, head_bottleneck_dim=128) if tiny else {}
    config = SSLConfig(
        model=ModelSettings(preset=preset, drop_path_rate=0.0, layerscale_value=1e-5, overrides=overrides),
        crops=crops,
        dino=DinoSettings(**heads),
        ibot=IbotSettings(**{k: v for k, v in heads.items() if k == "head_n_prototypes"}),
    )
    arch = SSLMetaArch(config)
    if naive:
        for part in (arch.student, arch.teacher):
            stock = to_transformers(part["backbone"]).train()
            part["backbone"] = StockBackbone(stock)
        arch.teacher.requires_grad_(False)
    return arch.to(device).train()


def fake_batch(crops: MultiCropSettings, images: int, patch: int, device: str) -> dict:
    samples = [
        {
            "global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size) for _ in range(2)],
            "local_crops": [torch.randn(3, crops.local_crops_size, crops.local_crops_size) for _ in range(crops.local_crops_number)],
        }
        for _ in range(images)
    ]
    batch = MultiCropCollator(crops.global_crops_size, patch, seed=0)(samples)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def measure(arch: SSLMetaArch, batch: dict, steps: int, warmup: int, device: str) -> float:
    optimizer = torch.optim.AdamW(param_groups(arch.student))
    schedules = build_schedules(arch.config.schedule, 1024)
    dtype = torch.bfloat16 if device == "cuda" else None
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        training_step(arch, optimizer, batch, schedules, 2000 + step, 3.0, autocast_dtype=dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=None, help="presets (default: a tiny ViT on CPU, vits14 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 16 on CPU, 64 on CUDA)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also measure ours with block-wise torch.compile (train.compile=true)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tiny = args.device == "cpu" and args.models is None
    presets = args.models or (["vits14"] if args.device == "cuda" else ["vits14"])
    batch_size = args.batch or (16 if args.device == "cpu" else 64)
    steps = args.steps or (5 if args.device == "cpu" else 20)
    crops = MultiCropSettings(global_crops_size=64, local_crops_size=32, local_crops_number=8) if tiny else MultiCropSettings()
    results = []
    for preset in presets:
        row = {"model": f"{preset}{' (tiny: width 96, 4 blocks, patch 8, 64/32 px crops)' if tiny else ''}", "images": batch_size}
        for impl in ("naive", "ours") + (("ours_compiled",) if args.compile else ()):
            arch = make_arch(preset, crops, naive=impl == "naive", device=args.device, tiny=tiny)
            if impl == "ours_compiled":
                torch._dynamo.reset()  # each model compiles from a clean cache
                arch.compile_blocks()
            patch = arch.teacher["backbone"].config.patch_size
            batch = fake_batch(crops, batch_size, patch, args.device)
            seconds = measure(arch, batch, steps, warmup=3 if impl == "ours_compiled" else 2, device=args.device)
            row[f"{impl}_img_per_s"] = round(batch_size / seconds, 2)
            if args.device == "cuda":
                params = sum(p.numel() for p in arch.student["backbone"].parameters())
                tokens_student = sum((s // patch) ** 2 + 1 for s in [crops.global_crops_size] * 2 + [crops.local_crops_size] * crops.local_crops_number)
                tokens_teacher = 2 * ((crops.global_crops_size // patch) ** 2 + 1)
                flops = batch_size * params * (6 * tokens_student + 2 * tokens_teacher)
                row[f"{impl}_mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
            del arch, batch
            if args.device == "cuda":
                torch.cuda.empty_cache()
        row["speedup"] = round(row["ours_img_per_s"] / row["naive_img_per_s"], 3)
        if args.compile:
            row["speedup_compiled"] = round(row["ours_compiled_img_per_s"] / row["naive_img_per_s"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    document = {"benchmark": "bench_train", "device": args.device, "torch": torch.__version__, "threads": args.threads, "results": results}
    if args.out:
        args.out.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
