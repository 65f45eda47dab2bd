"""TileInt4Linear (4x8 tiles, fp16 scale/zero) against a bf16 nn.Linear, 4096 -> 11008, on a CUDA GPU.

Usage: python benchmarks/int4_linear.py  (writes $OUT/int4_linear.log when OUT is set; prints a table last)
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from peft_balanced.quant import TileInt4Linear


def time_ms(fn, warmup: int = 20, iters: int = 200) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    dense = nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = TileInt4Linear.from_linear(dense, tile=(4, 8)).cuda()
    rows = []
    for tokens in (1, 16, 2048):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            reference = x.float() @ quant.dequantize(torch.float32).T
            error = ((quant(x).float() - reference).norm() / reference.norm()).item()
            bf16 = time_ms(lambda x=x: dense(x))
            int4 = time_ms(lambda x=x: quant(x))
        rows.append((tokens, bf16, int4, bf16 / int4, error))
    lines = [
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}",
        f"{'tokens':>7} {'bf16 ms':>9} {'int4 ms':>9} {'speedup':>8} {'rel err':>9}",
    ]
    lines += [f"{t:>7} {b:>9.4f} {q:>9.4f} {s:>8.2f} {e:>9.2e}" for t, b, q, s, e in rows]
    text = "\n".join(lines)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "int4_linear.log"), "w") as handle:
            handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
