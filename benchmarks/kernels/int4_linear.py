"""TileInt4Linear vs bf16 nn.Linear on one CUDA GPU: every kernel checked against float64, then timed per token count.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/int4_linear.py [--in 4096] [--out 11008] [--tokens 1 2 4 ... 2048]

1. Checks every candidate route of ``quant/kernels/route.py`` (the one-token GEMV, the small GEMM at each block shape,
   dequantize + cuBLAS) against a float64 product with the dequantized weight (max |y - ref| / max |ref|) on the
   timed shape and on ragged ones, and that a CUDA-graph replay of each equals its eager call bit for bit.
2. Times ``nn.Linear`` (bf16 weight) and ``TileInt4Linear`` (tile 4x8, fp16 scales, fp32 zero points: the defaults)
   forward at each token count, GPU time by CUDA events with the L2 flushed before every call (``route.time_on_device``):
   the route the layer measures and keeps (``int4``), the untuned default route, and every candidate.

Writes ``int4_linear.log`` and ``int4_linear.json`` under ``$OUT`` when set; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from peft_balanced.quant import TileInt4Linear, TileInt4Weight, dequantize_tiles, quantize_tiles
from peft_balanced.quant.kernels import route, triton_available

LINES: list[str] = []


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def rel_max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def check_routes(d_in: int, d_out: int, tol: float = 1e-2) -> bool:
    """Every candidate route on the timed shape and on ragged ones vs float64; graph replay vs eager."""
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [(d_out, d_in, (4, 8), m, torch.bfloat16, m % 2 == 1) for m in (1, 3, 16, 64)]
    cases += [(11000, 4128, (4, 8), 5, torch.float16, True), (200, 288, (8, 8), 1, torch.bfloat16, False)]
    for n, k, tile, m, dtype, has_bias in cases:
        weight = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        weight[3] += 1.0  # tiles far from zero: the zero-point term matters
        packed, scale, zero = quantize_tiles(weight, tile, torch.float16, zero_dtype=torch.float32)
        qweight = TileInt4Weight(packed, scale, zero, tile)
        x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
        bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(dtype) if has_bias else None
        ref = x.double() @ dequantize_tiles(packed, scale, zero, tile, torch.float64).T
        ref = ref + (bias.double() if has_bias else 0)
        for chosen in route.candidates(m, n, k, tile, dtype):
            try:
                y = route.route_kernel(chosen, x, qweight, bias)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    replayed = route.route_kernel(chosen, x, qweight, bias)
                graph.replay()
                same = torch.equal(replayed, y)
            except Exception as exc:  # report a kernel that does not build on this device, and go on
                say(f"check {n}x{k} M={m} {chosen.describe()}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                ok = False
                continue
            err = rel_max_error(y, ref)
            good = bool(torch.isfinite(y).all()) and err < tol and y.dtype == dtype and same
            ok &= good
            if not good or chosen.kernel != "small_gemm":
                say(
                    f"check {n}x{k} tile={tile} M={m} {str(dtype)[6:]} bias={int(has_bias)} {chosen.describe()}: "
                    f"max rel err {err:.2e}, graph replay equal {same} {'ok' if good else 'FAIL'}"
                )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="d_in", type=int, default=4096)
    parser.add_argument("--out", dest="d_out", type=int, default=11008)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 2048])
    parser.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and triton_available()):
        print("needs a CUDA GPU and Triton (and a kernel preference other than 'torch')")
        return 2
    import triton

    say(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ok = True
    if not args.no_check:
        start = time.time()
        ok = check_routes(args.d_in, args.d_out)
        say(f"route check {'passed' if ok else 'FAILED'} ({time.time() - start:.1f} s)")

    torch.manual_seed(0)
    lin = torch.nn.Linear(args.d_in, args.d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    layer = TileInt4Linear.from_linear(lin, (4, 8))
    rows = []
    with torch.inference_mode():
        for m in args.tokens:
            x = torch.randn(m, args.d_in, device="cuda", dtype=torch.bfloat16)
            start = time.time()
            layer(x)  # the first call measures the route for this bucket
            tune_s = time.time() - start
            chosen = route.choose_route(m, args.d_out, args.d_in, layer.tile, x.dtype)
            default = route.default_route(m, args.d_out, args.d_in, layer.tile, x.dtype)
            row = {
                "M": m,
                "bf16_ms": route.time_on_device(lambda x=x: lin(x), iters=100),
                "int4_ms": route.time_on_device(lambda x=x: layer(x), iters=100),
                "route": chosen.describe(),
                "tune_s": tune_s,
                "candidates": {},
            }
            for candidate in route.candidates(m, args.d_out, args.d_in, layer.tile, x.dtype):
                fn = lambda x=x, c=candidate: route.route_kernel(c, x, layer.packed_weight)  # noqa: E731
                row["candidates"][candidate.describe()] = route.time_on_device(fn, iters=50)
            row["default_ms"] = route.time_on_device(
                lambda x=x, d=default: route.route_kernel(d, x, layer.packed_weight), iters=50
            )
            row["default_route"] = default.describe()
            row["speedup"] = row["bf16_ms"] / row["int4_ms"]
            rows.append(row)
            say(f"M={m}: {json.dumps(row)}")
    say()
    say(f"{args.d_in} -> {args.d_out}, bf16 activations; int4 = TileInt4Linear tile (4, 8), fp16 scale, fp32 zero;")
    say("GPU time per call in ms (median, CUDA events, L2 flushed before each call)")
    say(f"{'M':>6} {'bf16':>8} {'int4':>8} {'speedup':>8} {'default':>8}  route measured and kept")
    for r in rows:
        say(
            f"{r['M']:>6} {r['bf16_ms']:>8.4f} {r['int4_ms']:>8.4f} {r['speedup']:>7.2f}x {r['default_ms']:>8.4f}  "
            f"{r['route']}"
        )
    out = os.environ.get("OUT")
    if out:
        tag = f"{args.d_in}x{args.d_out}"
        with open(os.path.join(out, f"int4_linear_{tag}.log"), "w") as handle:
            handle.write("\n".join(LINES) + "\n")
        with open(os.path.join(out, f"int4_linear_{tag}.json"), "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "check_ok": ok, "rows": rows}, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
