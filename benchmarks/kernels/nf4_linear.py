"""One bitsandbytes NF4 layer (4096 -> 11008), forward + input-gradient backward: bitsandbytes vs the fast path.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/nf4_linear.py [--tokens 2048] [--sync-debug]

For each path: GPU time per call (CUDA events, median of ``--iters``), host time to issue one call (wall time of
``--iters`` calls without synchronizing, divided by ``--iters``, while the GPU queue is not full), and with
``--sync-debug`` every host-device synchronization the call triggers (``torch.cuda.set_sync_debug_mode``).
Writes ``nf4_linear.log`` under ``$OUT`` when set; the table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

from peft_balanced.backends.nf4 import nf4_dequantize, nf4_linear


def nf4_layer(d_in: int, d_out: int):
    import bitsandbytes as bnb

    dense = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16, device="cuda")
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    return layer.to("cuda"), dense


def adapter_layers(layer, dense, step) -> dict:
    """Single-layer peft models: LoRA / BLoRA on the bf16 layer, QLoRA / Q-BLoRA on the NF4 one (r=64, λ=2)."""
    from peft import LoraConfig, get_peft_model

    from peft_balanced import BLoRAConfig

    out = {}
    for name, base, config in (
        ("LoRA on bf16", dense, LoraConfig(r=64, lora_alpha=128, target_modules=["0"])),
        ("BLoRA on bf16", dense, BLoRAConfig(r=64, balance_factor=2, lora_alpha=128, target_modules=["0"])),
        ("QLoRA on NF4", layer, LoraConfig(r=64, lora_alpha=128, target_modules=["0"])),
        ("Q-BLoRA on NF4", layer, BLoRAConfig(r=64, balance_factor=2, lora_alpha=128, target_modules=["0"])),
    ):
        model = get_peft_model(torch.nn.Sequential(copy.deepcopy(base)), config)
        out[name] = step(model)
    return out


def measure(fn, iters: int) -> tuple[float, float]:
    """(median GPU ms per call, host ms to issue one call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    gpu = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize()
    return statistics.median(gpu), host


def syncs(fn) -> list[str]:
    """Distinct warnings of synchronizing calls made by ``fn``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sorted({str(w.message).splitlines()[0][:160] for w in caught})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sync-debug", action="store_true")
    args = parser.parse_args()
    layer, dense = nf4_layer(args.in_features, args.out_features)
    x = torch.randn(args.tokens, args.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device="cuda", dtype=torch.bfloat16)
    state = layer.weight.quant_state

    def step(forward):
        def run():
            forward(x).backward(grad)
            x.grad = None

        return run

    paths = {
        "bf16 nn.Linear": step(dense.requires_grad_(False)),
        "bitsandbytes Linear4bit": step(layer),
        "fast path (nf4_linear)": step(lambda t: nf4_linear(layer, t)),
        "dequantize only (ours)": lambda: nf4_dequantize(layer.weight.data, state),
    }
    import bitsandbytes.functional as bnbF

    paths["dequantize only (bitsandbytes)"] = lambda: bnbF.dequantize_4bit(layer.weight.data, state)
    paths.update(adapter_layers(layer, dense, step))
    lines = [f"device: {torch.cuda.get_device_name()}, tokens {args.tokens}, {args.in_features}->{args.out_features}"]
    lines += ["", "| path | GPU ms / call | host ms / call | syncs |", "|---|---:|---:|---|"]
    for name, fn in paths.items():
        gpu_ms, host_ms = measure(fn, args.iters)
        found = "; ".join(syncs(fn)) if args.sync_debug else "-"
        lines.append(f"| {name} | {gpu_ms:.3f} | {host_ms:.3f} | {found or 'none'} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "nf4_linear.log"), "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
