"""Kernels of the quantized layers (CUDA + Triton; every one has a torch reference that runs anywhere).

* :mod:`.int4`: dequantize the 2-D-tile INT4 format in one kernel.
* :mod:`.gemv`: fused small-batch ``x W~ᵀ`` straight from packed tile-INT4 codes.
* :mod:`.small_gemm`: fused dequantize-GEMM for a few dozen tokens (opt-in: ``settings.set_int4_gemm_max_tokens``).
* :mod:`.splitk`: the same split along ``D_in`` over several programs (opt-in: ``settings.set_int4_gemv_kernel``).
* :mod:`.nf4`: dequantize a bitsandbytes NF4 weight in one kernel, and a linear built on it.
* :mod:`.support`: whether Triton can run (and is allowed by ``peft_balanced.settings``).
"""

from .gemv import fused_linear, gemv_reference, tile_int4_gemv, use_gemv
from .int4 import triton_dequantize_tiles
from .nf4 import nf4_dequantize, nf4_dequantize_reference, nf4_linear, uses_fast_nf4
from .small_gemm import tile_int4_small_gemm
from .splitk import tile_int4_splitk_gemv
from .support import triton_available

__all__ = [
    "fused_linear",
    "gemv_reference",
    "nf4_dequantize",
    "nf4_dequantize_reference",
    "nf4_linear",
    "tile_int4_gemv",
    "tile_int4_small_gemm",
    "tile_int4_splitk_gemv",
    "triton_available",
    "triton_dequantize_tiles",
    "use_gemv",
    "uses_fast_nf4",
]
