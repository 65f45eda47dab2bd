"""TileInt4Linear vs bf16 nn.Linear on one CUDA GPU: correctness of the fused small-M kernel, then timings.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/int4_linear.py [--in 4096] [--out 11008] [--tokens 1 16 2048]
        [--tune] [--tune-splitk] [--tune-gemm]

1. Checks the fused kernel (``peft_balanced.quant.kernels.gemv``) against a float64 product with the dequantized weight on
   several shapes, tiles and dtypes (max |y - ref| / max |ref|), the forward routing, and the input gradient.
2. Times ``nn.Linear`` (bf16 weight) and ``TileInt4Linear`` (tile 4x8, fp16 scale/zero, quantized from it) forward
   at each token count (CUDA events, median, L2 flushed before every call), and the opt-in kernels called directly:
   the split-K GEMV (``kernels.splitk``, up to 16 tokens) and the fused dequantize-GEMM (``kernels.small_gemm``).
   ``--tune-splitk`` / ``--tune-gemm`` sweep their block shapes first and use the fastest.

Writes ``int4_linear.log`` and ``int4_linear.json`` under ``$OUT`` when set; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import peft_balanced.quant.kernels.gemv as gemv
import peft_balanced.quant.kernels.small_gemm as small_gemm
import peft_balanced.quant.kernels.splitk as splitk
from peft_balanced.quant import TileInt4Linear, dequantize_tiles, quantize_tiles
from peft_balanced.quant.kernels import triton_available

LINES: list[str] = []


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def rel_max_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def check_kernel(tol: float = 1e-2) -> bool:
    """Fused kernel vs float64 reference; returns True when every case is within ``tol`` (bf16 output rounding)."""
    ok = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [  # (D_out, D_in, tile, tokens, dtype, bias)
        (11008, 4096, (4, 8), 1, torch.bfloat16, False),
        (11008, 4096, (4, 8), 3, torch.float16, True),
        (11008, 4096, (4, 8), 16, torch.bfloat16, True),
        (4096, 11008, (4, 8), 1, torch.bfloat16, False),
        (11000, 4100, (4, 8), 5, torch.bfloat16, True),  # ragged: neither block dimension divides evenly
        (1024, 2048, (8, 8), 2, torch.float16, False),
        (512, 768, (16, 1), 1, torch.float32, True),
        (256, 512, (2, 2), 16, torch.bfloat16, False),
    ]
    for d_out, d_in, tile, m, dtype, has_bias in cases:
        weight = torch.randn(d_out, d_in, device="cuda", generator=gen) * 0.02
        packed, scale, zero = quantize_tiles(weight, tile, torch.float16)
        x = torch.randn(m, d_in, device="cuda", generator=gen).to(dtype)
        bias = (torch.randn(d_out, device="cuda", generator=gen) * 0.1).to(dtype) if has_bias else None
        w64 = dequantize_tiles(packed, scale, zero, tile, torch.float64)
        ref = x.double() @ w64.T + (bias.double() if has_bias else 0)
        torch.empty(m * d_out * 4, device="cuda").fill_(float("nan"))  # poison the allocator's next block
        y = gemv.tile_int4_gemv(x, packed, scale, zero, tile, bias)
        err = rel_max_error(y, ref)
        base = rel_max_error(F.linear(x, w64.to(dtype), bias), ref)  # dequantize + cuBLAS, for comparison
        good = bool(torch.isfinite(y).all()) and err < tol and y.dtype == dtype
        ok &= good
        say(
            f"check {d_out}x{d_in} tile={tile} M={m} {str(dtype)[6:]:8s} bias={int(has_bias)}: "
            f"fused max rel err {err:.2e} (dequant+F.linear {base:.2e}) {'ok' if good else 'FAIL'}"
        )
        for label, fn, usable in (
            ("split-K", splitk.tile_int4_splitk_gemv, splitk.splitk_supported(tile, dtype, d_in) and m <= 16),
            ("small GEMM", small_gemm.tile_int4_small_gemm, small_gemm.small_gemm_supported(tile, dtype, d_in)),
        ):
            if not usable:
                continue
            y = fn(x, packed, scale, zero, tile, bias)
            err = rel_max_error(y, ref)
            good = bool(torch.isfinite(y).all()) and err < tol and y.dtype == dtype
            ok &= good
            say(f"check {d_out}x{d_in} tile={tile} M={m}: {label} max rel err {err:.2e} {'ok' if good else 'FAIL'}")
    # routing through TileInt4Linear.forward, 3-D input, and the input gradient
    lin = torch.nn.Linear(4096, 11008, device="cuda", dtype=torch.bfloat16)
    layer = TileInt4Linear.from_linear(lin, (4, 8), torch.float16)
    x = torch.randn(2, 1, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    routed = gemv.use_gemv(2, layer.tile, x.dtype, "cuda", True)
    calls = []
    real = gemv.tile_int4_gemv
    gemv.tile_int4_gemv = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        y = layer(x)
    finally:
        gemv.tile_int4_gemv = real
    w = layer.dequantize(torch.float32)
    ref = x.detach().double() @ w.double().T + lin.bias.double()
    err = rel_max_error(y, ref)
    y.float().square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2.float(), w, lin.bias.float()).square().sum().backward()
    gerr = rel_max_error(x.grad, x2.grad.double())
    good = len(calls) == int(routed) and err < 1e-2 and gerr < 3e-2 and y.shape == (2, 1, 11008)
    ok &= good
    say(
        f"forward (2, 1, 4096): fused kernel used {bool(calls)} (expected {routed}); err {err:.2e}; grad err {gerr:.2e}"
    )
    return ok


class Timer:
    """Median device time of ``fn`` in ms with CUDA events, each call after an L2 flush.

    A GPU-side sleep before each flush keeps the host ahead of the device, so Python and launch overhead are not
    timed (see ``host_ms`` for that). The flush *reads* a 256 MiB buffer, so L2 holds clean lines (as after the previous layers of a model) and evicting
    them costs no write-back. ``triton.testing.do_bench`` flushes by *writing* (zeroing) its buffer, which adds up to
    50 MB of dirty write-back to whatever runs next and so penalises small reads most; its median is logged as well.
    """

    def __init__(self) -> None:
        self.flush = torch.rand(64 << 20, device="cuda")  # 256 MiB, several times the L2

    def __call__(self, fn, iters: int = 200, warmup: int = 10) -> float:
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends, strict=True):
            torch.cuda._sleep(600_000)  # ~0.3 ms of GPU time: the host enqueues fn before the GPU reaches it
            self.flush.sum()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))[iters // 2]


def do_bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_ms(fn, iters: int = 200) -> float:
    """Wall time per call of ``fn`` called back to back (eager mode, no flush: bounded by host overhead or GPU)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def tune(timer: Timer, d_in: int, d_out: int) -> None:
    """Sweep the fused kernel's block shapes per token bucket, keep the fastest in ``gemv._CONFIGS``, and set
    ``gemv.GEMV_MAX_TOKENS`` to the largest bucket up to which the fused kernel beats dequantize + cuBLAS."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = TileInt4Linear.from_linear(lin, (4, 8), torch.float16)
    args = (layer.qweight, layer.scale, layer.zero, layer.tile)
    grid = {  # (rows, block_w, num_warps, prefetch); M = 1 runs gemv1_kernel, which ignores prefetch
        1: [(8, 256, 4, 0), (16, 256, 4, 0), (16, 256, 8, 0), (32, 256, 8, 0), (8, 512, 4, 0), (8, 128, 4, 0)]
        + [(8, 256, 2, 0), (16, 512, 8, 0), (8, 1024, 8, 0), (16, 128, 4, 0)],
        2: [(r, w, 4, pf) for r in (8, 16) for w in (128, 256) for pf in (0, 1)],
        4: [(8, w, nw, 1) for w in (64, 128, 256) for nw in (4, 8)] + [(8, 256, 4, 0), (16, 128, 4, 1)],
        8: [(8, w, nw, pf) for w in (32, 64, 128) for nw in (4,) for pf in (0, 1)],
        16: [(8, w, nw, pf) for w in (32, 64) for nw in (4, 8) for pf in (1,)],
    }
    max_tokens = 0
    for bucket, shapes in grid.items():
        x = torch.randn(bucket, d_in, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ layer.dequantize(torch.float64).T
        best = None
        for rows, block_w, warps, prefetch in shapes:
            cfg = {"rows": rows, "block_w": block_w, "num_warps": warps, "prefetch": prefetch}
            try:
                err = rel_max_error(gemv.tile_int4_gemv(x, *args, config=cfg), ref)
                t = timer(lambda x=x, cfg=cfg: gemv.tile_int4_gemv(x, *args, config=cfg), iters=50)
            except Exception as exc:  # a shape that does not compile or fit: report and skip
                say(f"tune M={bucket} {cfg}: failed {type(exc).__name__}: {str(exc)[:120]}")
                continue
            say(f"tune M={bucket} {cfg}: {t * 1e3:.2f} us, max rel err {err:.1e}")
            if err < 1e-2 and (best is None or t < best[0]):
                best = (t, cfg)
        if best is None:
            break
        gemv._CONFIGS[bucket] = best[1]
        saved, gemv.GEMV_MAX_TOKENS = gemv.GEMV_MAX_TOKENS, 0
        with torch.inference_mode():
            t_dequant = timer(lambda x=x: layer(x), iters=50)
        gemv.GEMV_MAX_TOKENS = saved
        say(f"tune M={bucket}: best {best[1]} {best[0] * 1e3:.2f} us; dequantize + cuBLAS {t_dequant * 1e3:.2f} us")
        if best[0] < t_dequant and max_tokens == bucket // 2:
            max_tokens = bucket
    gemv.GEMV_MAX_TOKENS = max_tokens
    say(f"tuned: GEMV_MAX_TOKENS = {gemv.GEMV_MAX_TOKENS}; _CONFIGS = {json.dumps(gemv._CONFIGS)}")


def tune_new_kernels(timer: Timer, d_in: int, d_out: int, which: str) -> None:
    """Sweep the split-K GEMV's (``which="splitk"``) or the small GEMM's (``"gemm"``) block shapes and keep the
    fastest correct one (``splitk._CONFIGS`` per bucket, ``small_gemm.SMALL_GEMM_CONFIG``)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = TileInt4Linear.from_linear(lin, (4, 8), torch.float16)
    args = (layer.qweight, layer.scale, layer.zero, layer.tile)
    if which == "splitk":
        shapes = {
            m: [
                ({"rows": r, "block_w": w, "num_warps": nw}, sk)
                for r in (16, 32, 64)
                for w in (32, 64, 128)
                for nw in (4, 8)
                for sk in (1, 2, 4, 8)  # a run-time argument: no extra compile
                if r * w * m <= 16384
            ]
            for m in (1, 2, 4, 8, 16)
        }
    else:
        shapes = {
            m: [
                (
                    {
                        "block_n": n,
                        "block_k": k,
                        "block_m": min(64, max(16, m)),
                        "split_k": sk,
                        "num_warps": nw,
                        "num_stages": st,
                    },
                    None,
                )
                for n in (64, 128)
                for k in (64, 128)
                for sk in (1, 2, 4)
                for nw in (4, 8)
                for st in (3, 4)
            ]
            for m in (16, 32, 64)
        }
    for m, grid in shapes.items():
        x = torch.randn(m, d_in, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ layer.dequantize(torch.float64).T
        best = None
        for cfg, sk in grid:
            if which == "splitk":
                fn = lambda x=x, cfg=cfg, sk=sk: splitk.tile_int4_splitk_gemv(x, *args, config=cfg, split_k=sk)  # noqa: E731
            else:
                fn = lambda x=x, cfg=cfg: small_gemm.tile_int4_small_gemm(x, *args, config=cfg)  # noqa: E731
            try:
                err = rel_max_error(fn(), ref)
                t = timer(fn, iters=30)
            except Exception as exc:  # a shape that does not compile or fit: report and skip
                say(f"tune {which} M={m} {cfg} split_k={sk}: failed {type(exc).__name__}: {str(exc)[:100]}")
                continue
            if err < 1e-2 and (best is None or t < best[0]):
                best = (t, cfg, sk)
        if best is None:
            continue
        say(f"tune {which} M={m}: best {best[1]} split_k={best[2]}: {best[0] * 1e3:.2f} us")
        if which == "splitk":
            splitk._CONFIGS[m] = {**best[1], "split_k": best[2]}  # tuned for this layer shape only
        elif m == 64:
            small_gemm.SMALL_GEMM_CONFIG.update(best[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in", dest="d_in", type=int, default=4096)
    parser.add_argument("--out", dest="d_out", type=int, default=11008)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 64, 2048])
    parser.add_argument("--tune", action="store_true", help="sweep the fused kernel's block shapes first and use them")
    parser.add_argument("--tune-splitk", action="store_true", help="sweep the split-K GEMV's block shapes first")
    parser.add_argument("--tune-gemm", action="store_true", help="sweep the small GEMM's block shapes first")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and triton_available()):
        print("needs a CUDA GPU and Triton (and a kernel preference other than 'torch')")
        return 2
    import triton

    say(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    timer = Timer()
    if args.tune:
        start = time.time()
        tune(timer, args.d_in, args.d_out)
        say(f"tuning took {time.time() - start:.0f} s")
    for which, wanted in (("splitk", args.tune_splitk), ("gemm", args.tune_gemm)):
        if wanted:
            start = time.time()
            tune_new_kernels(timer, args.d_in, args.d_out, which)
            say(f"tuning {which} took {time.time() - start:.0f} s")
    start = time.time()
    ok = check_kernel()
    say(f"kernel check {'passed' if ok else 'FAILED'} ({time.time() - start:.1f} s)")

    torch.manual_seed(0)
    lin = torch.nn.Linear(args.d_in, args.d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    layer = TileInt4Linear.from_linear(lin, (4, 8), torch.float16)
    rows = []
    with torch.inference_mode():
        for m in args.tokens:
            x = torch.randn(m, args.d_in, device="cuda", dtype=torch.bfloat16)
            row = {"M": m, "bf16_ms": timer(lambda x=x: lin(x)), "int4_ms": timer(lambda x=x: layer(x))}
            row["speedup"] = row["bf16_ms"] / row["int4_ms"]
            row["fused"] = gemv.use_gemv(m, layer.tile, x.dtype, "cuda", True)
            qargs = (x, layer.qweight, layer.scale, layer.zero, layer.tile)
            if m <= splitk.SPLITK_MAX_TOKENS:
                row["splitk_ms"] = timer(lambda qargs=qargs: splitk.tile_int4_splitk_gemv(*qargs))
                row["splitk_speedup"] = row["bf16_ms"] / row["splitk_ms"]
            row["gemm_ms"] = timer(lambda qargs=qargs: small_gemm.tile_int4_small_gemm(*qargs))
            row["gemm_speedup"] = row["bf16_ms"] / row["gemm_ms"]
            row["do_bench_bf16_ms"] = do_bench_ms(lambda x=x: lin(x))
            row["do_bench_int4_ms"] = do_bench_ms(lambda x=x: layer(x))
            row["host_bf16_ms"], row["host_int4_ms"] = host_ms(lambda x=x: lin(x)), host_ms(lambda x=x: layer(x))
            rows.append(row)
            say(f"M={m}: {json.dumps(row)}")
        t_dequant = timer(lambda: layer.dequantize(torch.bfloat16))
    say(f"dequantize alone ({args.d_out}x{args.d_in} -> bf16): {t_dequant * 1e3:.1f} us")
    say()
    say(f"{args.d_in} -> {args.d_out}, bf16 activations; int4 = TileInt4Linear tile (4, 8), fp16 scale/zero;")
    say("median of 200 calls, CUDA events, L2 flushed (read) before each call")
    say("split-K / small GEMM: the opt-in kernels called directly (settings.set_int4_gemv_kernel('split_k'),")
    say("settings.set_int4_gemm_max_tokens(n)); the int4 column is TileInt4Linear's default routing")
    say(
        f"{'M':>6} {'bf16 ms':>10} {'int4 ms':>10} {'split-K ms':>11} {'GEMM ms':>10}  {'int4 path':<20} speedup vs bf16"
    )
    for r in rows:
        path = "fused kernel" if r["fused"] else "dequantize + cuBLAS"
        split = f"{r['splitk_ms']:>11.4f}" if "splitk_ms" in r else f"{'-':>11}"
        best = max(r["speedup"], r.get("splitk_speedup", 0.0), r["gemm_speedup"])
        say(
            f"{r['M']:>6} {r['bf16_ms']:>10.4f} {r['int4_ms']:>10.4f} {split} {r['gemm_ms']:>10.4f}  {path:<20} "
            f"default {r['speedup']:.2f}x, best {best:.2f}x"
        )
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "int4_linear.log"), "w") as handle:
            handle.write("\n".join(LINES) + "\n")
        with open(os.path.join(out, "int4_linear.json"), "w") as handle:
            result = {"device": torch.cuda.get_device_name(), "check_ok": ok, "rows": rows}
            result["gemv_max_tokens"], result["gemv_configs"] = gemv.GEMV_MAX_TOKENS, gemv._CONFIGS
            result["splitk_configs"], result["small_gemm_config"] = splitk._CONFIGS, small_gemm.SMALL_GEMM_CONFIG
            json.dump(result, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
