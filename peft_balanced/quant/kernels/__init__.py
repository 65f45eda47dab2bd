"""Kernels of the tile-INT4 layers (CUDA + Triton; every one has a torch reference that runs anywhere).

* :mod:`.int4`: dequantize the 2-D-tile INT4 format in one kernel.
* :mod:`.gemv`: fused one-token ``x W~ᵀ`` straight from packed tile-INT4 codes.
* :mod:`.small_gemm`: fused dequantize-GEMM (tensor cores) for up to a few dozen tokens.
* :mod:`.route`: which of them (or dequantize + cuBLAS) a ``TileInt4Linear`` call runs, measured per layer shape.
* :mod:`.support`: whether Triton can run (and is allowed by ``peft_balanced.settings``).
"""

from .gemv import gemv_reference, tile_int4_gemv
from .int4 import triton_dequantize_tiles
from .route import Route, choose_route, tile_int4_linear, tune_routes, tuned_routes
from .small_gemm import tile_int4_small_gemm
from .support import triton_available

__all__ = [
    "Route",
    "choose_route",
    "gemv_reference",
    "tile_int4_linear",
    "tile_int4_gemv",
    "tile_int4_small_gemm",
    "triton_available",
    "triton_dequantize_tiles",
    "tune_routes",
    "tuned_routes",
]
