"""How a ``TileInt4Linear`` forward is computed: :func:`tile_int4_linear`, the one place that decides.

Off CUDA, without Triton, under the ``"torch"`` kernel preference, or when ``scale`` / ``zero`` / ``bias`` want a
gradient: the torch reference (``dequantize_tiles`` + ``F.linear``). In training (the input wants a gradient): the
weight decoded in the forward and again in the backward (``int4.dequantized_linear``), never saved. Otherwise, on
CUDA, one of these routes, per token count and layer shape (all Triton, all read the packed codes):

* ``gemv`` (:mod:`.gemv`) with a block shape: one token, products in registers, no tensor cores.
* ``small_gemm`` (:mod:`.small_gemm`) with a block shape: up to ``SMALL_GEMM_MAX_TOKENS`` tokens, tensor cores.
* ``dequantize`` (:mod:`.int4` + cuBLAS): the weight decoded to 16 bits, then ``F.linear``; any token count.

The first eager call with a new ``(D_out, D_in, tile, dtype, token bucket)`` (buckets: powers of two up to
``SMALL_GEMM_MAX_TOKENS``) times every candidate on random data of that shape, with the L2 cache flushed before each
call, and keeps the fastest for the process (:func:`tuned_routes`); ``peft_balanced.settings.set_int4_autotune(False)``
turns the measuring off. Calls under ``torch.compile`` or CUDA-graph capture never measure: they take the route
measured before, or :func:`default_route`. :func:`tune_routes` measures chosen token counts up front (before
compiling, say).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...settings import int4_autotune_allowed
from ..tile_int4 import TileInt4Weight
from .gemv import gemv_supported, tile_int4_gemv
from .int4 import dequantize_tiles_on_device, dequantized_linear, linear_with_kernel
from .small_gemm import DEFAULT_CONFIG, small_gemm_supported, tile_int4_small_gemm
from .support import triton_available

__all__ = [
    "SMALL_GEMM_MAX_TOKENS",
    "Route",
    "bucket",
    "candidates",
    "choose_route",
    "default_route",
    "route_kernel",
    "tile_int4_linear",
    "time_on_device",
    "tune_routes",
    "tuned_routes",
]

# Above this many tokens: dequantize + cuBLAS, measured faster than the small GEMM at 32 and 64 tokens on an H100
# (docs/benchmarks.md, issue 21).
SMALL_GEMM_MAX_TOKENS = 16

# The block shapes that won somewhere in that measurement (the others were dropped):
# (block_n, block_k, num_warps, num_stages) of the small GEMM; split_k follows from the grid (see _split_for)
_SMALL_GEMM_SHAPES = ((32, 256, 4, 3), (64, 256, 4, 3), (64, 128, 4, 4))
# (rows, block_w, num_warps) of the one-token GEMV: block_w words of the code row per step
_GEMV_SHAPES = ((8, 256, 4), (8, 128, 4), (16, 256, 8))


class Route(NamedTuple):
    """A kernel (``"gemv"``, ``"small_gemm"`` or ``"dequantize"``) and the block shape it runs with (empty: the
    kernel's default)."""

    kernel: str
    config: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        """``"small_gemm {'block_n': 32, ...}"``: for logs and tables."""
        return self.kernel + (f" {dict(self.config)}" if self.config else "")


Key = tuple[int, int, tuple[int, int], str, int]  # D_out, D_in, tile, dtype name, token bucket
_TUNED: dict[Key, Route] = {}


def bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (the unit of measuring)."""
    return 1 << max(tokens - 1, 0).bit_length()


@torch.compiler.assume_constant_result  # under torch.compile: asked once when tracing, a constant in the graph
def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _key(d_out: int, d_in: int, tile: tuple[int, int], dtype: torch.dtype, tokens: int) -> Key:
    return (d_out, d_in, (tile[0], tile[1]), str(dtype).removeprefix("torch."), bucket(tokens))


def _split_for(d_out: int, d_in: int, block_n: int, block_k: int, sms: int) -> int:
    """Slices of ``D_in`` so that about two programs per multiprocessor share the weight (each slice at least two
    steps long); 1 when the output blocks alone fill the device."""
    blocks = -(-d_out // block_n)
    if blocks >= sms:
        return 1
    return max(1, min(-(-2 * sms // blocks), d_in // (2 * block_k), 8))


def _small_gemm_route(d_out: int, d_in: int, tokens: int, shape: tuple[int, int, int, int], sms: int) -> Route:
    block_n, block_k, warps, stages = shape
    config = {
        **DEFAULT_CONFIG,
        "block_n": block_n,
        "block_k": block_k,
        "block_m": min(max(16, bucket(tokens)), SMALL_GEMM_MAX_TOKENS),
        "split_k": _split_for(d_out, d_in, block_n, block_k, sms),
        "num_warps": warps,
        "num_stages": stages,
    }
    return Route("small_gemm", tuple(config.items()))


def candidates(tokens: int, d_out: int, d_in: int, tile: tuple[int, int], dtype: torch.dtype) -> list[Route]:
    """The routes measured for this layer and token count (``dequantize`` always among them)."""
    routes: list[Route] = []
    if tokens == 1 and gemv_supported(tile, dtype):
        keys = ("rows", "block_w", "num_warps")
        routes += [Route("gemv", tuple(zip(keys, shape, strict=True))) for shape in _GEMV_SHAPES]
    if tokens <= SMALL_GEMM_MAX_TOKENS and small_gemm_supported(tile, dtype, d_in):
        sms = _sms()
        routes += [_small_gemm_route(d_out, d_in, tokens, shape, sms) for shape in _SMALL_GEMM_SHAPES]
    return [*dict.fromkeys(routes), Route("dequantize")]


def default_route(tokens: int, d_out: int, d_in: int, tile: tuple[int, int], dtype: torch.dtype) -> Route:
    """The route when nothing was measured: the GEMV for one token, the small GEMM (32 x 256 blocks) up to
    ``SMALL_GEMM_MAX_TOKENS`` tokens, dequantize + cuBLAS above or where a kernel does not apply."""
    if tokens == 1 and gemv_supported(tile, dtype):
        return Route("gemv")
    if tokens <= SMALL_GEMM_MAX_TOKENS and small_gemm_supported(tile, dtype, d_in):
        return _small_gemm_route(d_out, d_in, tokens, (32, 256, 4, 3), _sms())
    return Route("dequantize")


def choose_route(
    tokens: int,
    d_out: int,
    d_in: int,
    tile: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> Route:
    """The route for ``tokens`` rows through a ``(D_out, D_in)`` layer: measured once per key on an eager call on
    ``device`` (default: the current CUDA device; see the module's docstring), else :func:`default_route`."""
    if tokens > SMALL_GEMM_MAX_TOKENS:
        return Route("dequantize")
    key = _key(d_out, d_in, tile, dtype, tokens)
    if key in _TUNED:
        return _TUNED[key]
    if torch.compiler.is_compiling() or not int4_autotune_allowed() or _capturing():
        return default_route(tokens, d_out, d_in, tile, dtype)
    return _tune(key, dtype, device)


def tuned_routes() -> dict[Key, Route]:
    """The routes measured so far in this process: ``(D_out, D_in, tile, dtype, token bucket) -> Route``."""
    return dict(_TUNED)


def tune_routes(layers, tokens: tuple[int, ...] = (1,)) -> dict[Key, Route]:
    """Measure the routes of every distinct tile-INT4 layer shape in ``layers`` (a module, or an iterable of layers
    with a ``packed_weight``) for each token count in ``tokens``, in each layer's ``compute_dtype``; returns
    :func:`tuned_routes`."""
    modules = layers.modules() if isinstance(layers, torch.nn.Module) else layers
    for layer in modules:
        weight = getattr(layer, "packed_weight", None)
        if isinstance(weight, TileInt4Weight) and weight.packed.is_cuda:
            for count in tokens:
                key = _key(*weight.shape, weight.tile, layer.compute_dtype, count)
                if key not in _TUNED and count <= SMALL_GEMM_MAX_TOKENS:
                    _tune(key, layer.compute_dtype, weight.packed.device)
    return tuned_routes()


def route_kernel(
    route: Route, x: torch.Tensor, weight: TileInt4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (M, D_in) -> (M, D_out)`` in ``x.dtype`` through ``route`` (``dequantize``: the Triton decode + cuBLAS)."""
    if route.kernel == "gemv":
        return tile_int4_gemv(x, weight, bias, config=dict(route.config))
    if route.kernel == "small_gemm":
        return tile_int4_small_gemm(x, weight, bias, config=dict(route.config))
    return F.linear(x, dequantize_tiles_on_device(weight, x.dtype), bias)


def dequantize(weight: TileInt4Weight, dtype: torch.dtype) -> torch.Tensor:
    """``W~ (D_out, D_in)`` in ``dtype``: the Triton kernel on CUDA when allowed, else the torch reference."""
    if weight.packed.is_cuda and triton_available():
        return dequantize_tiles_on_device(weight, dtype)
    return weight.dequantize(dtype)


def tile_int4_linear(
    x: torch.Tensor,
    weight: TileInt4Weight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    needs_param_grad: bool = False,
) -> torch.Tensor:
    """``F.linear(x, W~, bias)`` in ``dtype`` for ``x (..., D_in)``, by the route this call takes (module docstring).
    ``needs_param_grad``: ``scale`` / ``zero`` / ``bias`` want a gradient (only the torch reference gives one)."""
    d_out, d_in = weight.shape
    tokens = x.numel() // d_in if d_in else 0
    if tokens and x.is_cuda and not needs_param_grad and triton_available():
        route = choose_route(tokens, d_out, d_in, weight.tile, dtype, x.device)
        if route.kernel != "dequantize":
            return linear_with_kernel(functools.partial(route_kernel, route), x.to(dtype), weight, bias)
    if torch.is_grad_enabled() and x.requires_grad and x.dtype == dtype and not needs_param_grad:
        return dequantized_linear(x, weight, bias)  # training: decoded again for the backward, never saved
    return F.linear(x, dequantize(weight, dtype), bias)


@functools.lru_cache(maxsize=1)
def _flush_buffer(device: int) -> torch.Tensor:
    size = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(max(size, 1 << 20) // 2, dtype=torch.float32, device=f"cuda:{device}")  # 2x the L2, read


def time_on_device(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median GPU time of ``fn()`` in ms (CUDA events), the L2 cache flushed (read, so nothing is written back)
    before every call, and the host kept ahead of the GPU so that launch overhead is not counted."""
    flush = _flush_buffer(torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        torch.cuda._sleep(2_000_000)  # ~1 ms: the host enqueues fn (launches, allocations) before the GPU gets there
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


@torch.no_grad()
def _tune(key: Key, dtype: torch.dtype, device: torch.device | None = None) -> Route:
    """Time every candidate of ``key`` on random data of its shape on ``device``; cache and return the fastest."""
    d_out, d_in, tile, _, tokens = key
    l1, l2 = tile
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    best: tuple[float, Route] | None = None
    with torch.cuda.device(device):
        gen = torch.Generator(device=device).manual_seed(0)
        packed = torch.randint(0, 256, (d_out, d_in // 2), dtype=torch.uint8, device=device, generator=gen)
        scale = torch.rand(d_out // l2, d_in // l1, device=device, generator=gen).to(torch.float16) * 1e-2
        zero = torch.randn(d_out // l2, d_in // l1, device=device, generator=gen) * 1e-2
        weight = TileInt4Weight(packed, scale, zero, tile)
        x = torch.randn(tokens, d_in, device=device, generator=gen).to(dtype)
        for route in candidates(tokens, d_out, d_in, tile, dtype):
            fn = functools.partial(route_kernel, route, x, weight, None)
            try:
                ms = time_on_device(fn)
            except Exception:  # a block shape this device cannot compile or fit: not a candidate  # noqa: BLE001
                continue
            if best is None or ms < best[0]:
                best = (ms, route)
    route = best[1] if best else Route("dequantize")
    _TUNED[key] = route
    return route
