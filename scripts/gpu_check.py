"""Correctness of the model on an accelerator (runs on CPU too, for the logic).

    python scripts/gpu_check.py --out gpu_check.json

Checks, each reported as a max-abs difference (JSON):
- fp32 outputs of ours vs stock transformers Dinov2Model / Dinov2WithRegistersModel (TF32 off)
  at 224, 518 and a non-square size, with iBOT masks;
- packed vs separate forwards: outputs and parameter gradients (fp32 and bf16 autocast);
- every available attention backend (eager, sdpa, flex_attention, flash_attention_2) vs sdpa,
  forward and backward;
- block-wise torch.compile vs eager on the packed multi-crop pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel  # noqa: E402
from dinov2_hf.modeling.convert_transformers import to_transformers  # noqa: E402


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def randomized(config: Dinov2HFConfig, device: str) -> Dinov2HFModel:
    torch.manual_seed(0)
    model = Dinov2HFModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model.to(device)


def parity_vs_transformers(device: str) -> dict:
    results = {}
    for registers in (0, 4):
        ours = randomized(Dinov2HFConfig.from_preset("vits14", num_register_tokens=registers), device).eval()
        stock = to_transformers(ours).to(device).eval()
        for height, width in ((224, 224), (518, 518), (168, 308)):
            x = torch.randn(4, 3, height, width, device=device)
            masks = torch.rand(4, (height // 14) * (width // 14), device=device) < 0.3
            with torch.no_grad():
                diff = max_diff(ours(x, bool_masked_pos=masks).last_hidden_state, stock(x, bool_masked_pos=masks).last_hidden_state)
            results[f"{type(stock).__name__}_{height}x{width}"] = diff
    return results


def multicrop(device: str, batch: int = 8):
    global_crops = torch.randn(2 * batch, 3, 224, 224, device=device)
    local_crops = torch.randn(8 * batch, 3, 98, 98, device=device)
    masks = torch.rand(2 * batch, 256, device=device) < 0.3
    return global_crops, local_crops, masks


def packed_vs_separate(device: str, dtype: torch.dtype | None) -> dict:
    model = randomized(Dinov2HFConfig.from_preset("vits14", num_hidden_layers=4), device).train()
    global_crops, local_crops, masks = multicrop(device)

    def run(packed: bool):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            if packed:
                outputs = model.forward_packed([global_crops, local_crops], [masks, None])
            else:
                outputs = [model(global_crops, bool_masked_pos=masks), model(local_crops)]
            loss = sum(o.last_hidden_state.float().square().mean() for o in outputs)
        loss.backward()
        return [o.last_hidden_state.detach() for o in outputs], {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_out, packed_grads = run(True)
    separate_out, separate_grads = run(False)
    # ||packed - separate|| / ||separate|| per parameter; bf16 rounds differently when the weight
    # gradient is one GEMM over all tokens instead of a sum of two, so report the worst and the median.
    relative = {
        n: ((packed_grads[n] - separate_grads[n]).norm() / (separate_grads[n].norm() + 1e-12)).item() for n in packed_grads
    }
    worst = max(relative, key=relative.get)
    return {
        "output": max(max_diff(a, b) for a, b in zip(packed_out, separate_out)),
        "grad_relative_worst": relative[worst],
        "grad_relative_worst_param": worst,
        "grad_relative_median": sorted(relative.values())[len(relative) // 2],
    }


def attention_backends(device: str) -> dict:
    from transformers.utils import is_flash_attn_2_available

    results = {"flash_attn_2_installed": is_flash_attn_2_available()}
    model = randomized(Dinov2HFConfig.from_preset("vits14", num_hidden_layers=2), device).train()
    global_crops, local_crops, masks = multicrop(device, batch=4)
    dtype = torch.bfloat16 if device == "cuda" else None

    def run():
        model.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            outputs = model.forward_packed([global_crops, local_crops], [masks, None])
            loss = sum(o.last_hidden_state.float().square().mean() for o in outputs)
        loss.backward()
        return outputs[0].last_hidden_state.detach(), model.encoder.layer[0].attention.qkv.weight.grad.clone()

    model.set_attn_implementation("sdpa")
    reference_out, reference_grad = run()
    backends = ["eager", "flex_attention"] + (["flash_attention_2"] if results["flash_attn_2_installed"] else [])
    for backend in backends:
        try:
            model.set_attn_implementation(backend)
            out, grad = run()
            results[backend] = {"output": max_diff(out, reference_out), "qkv_grad_relative": max_diff(grad, reference_grad) / reference_grad.abs().max().item()}
        except Exception as error:  # a backend failing here is a finding to report
            results[backend] = {"error": repr(error)[:400]}
    return results


def compiled_blocks(device: str) -> dict:
    model = randomized(Dinov2HFConfig.from_preset("vits14", num_hidden_layers=4), device).eval()
    global_crops, local_crops, masks = multicrop(device, batch=4)
    with torch.no_grad():
        eager = model.forward_packed([global_crops, local_crops], [masks, None])
        for layer in model.encoder.layer:
            layer.compile(dynamic=False)
        compiled = model.forward_packed([global_crops, local_crops], [masks, None])
        single = model(global_crops).last_hidden_state  # a second token layout: recompiles, must not crash
    return {"output": max(max_diff(a.last_hidden_state, b.last_hidden_state) for a, b in zip(eager, compiled)), "single_shape": list(single.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checks = {
        "parity_fp32": lambda: parity_vs_transformers(args.device),
        "packed_vs_separate_fp32": lambda: packed_vs_separate(args.device, None),
        "packed_vs_separate_bf16": lambda: packed_vs_separate(args.device, torch.bfloat16),
        "attention_backends": lambda: attention_backends(args.device),
    }
    if not args.skip_compile:
        checks["compiled_blocks"] = lambda: compiled_blocks(args.device)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    for name, check in checks.items():
        try:
            report[name] = check()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-1500:]}
        print(name, json.dumps(report[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
