"""A faster training path for bitsandbytes NF4 layers on CUDA: one Triton dequantize kernel, then cuBLAS.

bitsandbytes' ``matmul_4bit`` dequantizes a double-quantized NF4 weight with several kernels (the nested absmax, its
offset, then the codes) and allocations, in the forward and again in the backward. :func:`nf4_linear` does the same
math in one kernel: ``W[i] = code[q_i] · (code2[a_b] · absmax2[b // 256] + offset)`` for element ``i`` of block ``b``,
in float32 without FMA contraction and rounded once to the compute dtype, so the dequantized weight is bit-identical
to ``bitsandbytes.functional.dequantize_4bit`` (checked by the CPU reference :func:`nf4_dequantize_reference` and the
CUDA tests). The product is ``F.linear`` on that weight, so outputs differ from bitsandbytes' only by cuBLAS
choosing another kernel (bf16 rounding). The dequantized weight is not kept for the backward: it is recomputed.

The adapter layers use it for bitsandbytes NF4 bases on CUDA when more than :data:`MIN_TOKENS` tokens go through
(short inputs keep bitsandbytes' inference GEMV), through the fast-NF4 quantization backend
(``backends/bitsandbytes.py``). ``peft_balanced.set_kernel_preference("bitsandbytes")`` (or ``"torch"``) turns it off.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.kernels.support import TRITON_OPS, define_triton_op, triton_available
from ..settings import fast_nf4_allowed

__all__ = ["MIN_TOKENS", "nf4_dequantize", "nf4_dequantize_reference", "nf4_linear", "uses_fast_nf4"]

MIN_TOKENS = 16  # at or below this many tokens bitsandbytes' own inference kernels are kept


def _absmax(quant_state: Any) -> torch.Tensor:
    """Per-block absmax ``(n_blocks,)`` in float32, undoing bitsandbytes' double quantization if present."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    scales = state2.absmax.repeat_interleave(state2.blocksize)[: quant_state.absmax.numel()]
    return state2.code[quant_state.absmax.long()] * scales + quant_state.offset


def nf4_dequantize_reference(packed: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference: packed bytes ``(numel/2, 1)`` (high nibble first) -> weight ``quant_state.shape``."""
    flat = packed.reshape(-1).to(torch.int64)
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)
    values = quant_state.code[codes].view(-1, quant_state.blocksize) * _absmax(quant_state)[:, None]
    return values.reshape(quant_state.shape).to(dtype or quant_state.dtype)


@functools.lru_cache(maxsize=1)
def _build_kernel():  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def nf4_dequant_kernel(
        q_ptr,
        absmax_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        out_ptr,
        numel,
        n_blocks,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
    ):
        # One program: BLOCKS_PER_PROGRAM quantization blocks; one absmax per block, codes as (blocks, bytes).
        blocks = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        block_ok = blocks < n_blocks
        if NESTED:
            code_a = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            # mul_rn is never contracted with the add into an FMA: two roundings, as bitsandbytes' two kernels
            scale = libdevice.mul_rn(
                tl.load(code2_ptr + code_a, mask=block_ok, other=0.0),
                tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=block_ok, other=0.0),
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0).to(tl.float32)
        byte_idx = blocks.to(tl.int64)[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        byte_ok = byte_idx < (numel + 1) // 2
        packed = tl.load(q_ptr + byte_idx, mask=byte_ok, other=0).to(tl.int32)
        high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
        low = tl.load(code_ptr + (packed & 15)) * scale[:, None]
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)  # high nibble = even element
        out_idx = blocks.to(tl.int64)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + out_idx, values, mask=out_idx < numel)

    return triton, nf4_dequant_kernel


def nf4_dequantize(
    packed: torch.Tensor, quant_state: Any, dtype: torch.dtype | None = None, traced: bool = False
) -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight to ``quant_state.shape`` in ``dtype`` (default: its original dtype).

    One Triton kernel on CUDA, the torch reference elsewhere; both bit-identical to bitsandbytes. ``traced``: the
    kernel is launched through ``torch.library.wrap_triton`` (the body of the ``peft_balanced::nf4_dequantize`` op).
    """
    dtype = dtype or quant_state.dtype
    blocksize = quant_state.blocksize
    if not (packed.is_cuda and triton_available() and blocksize % 2 == 0 and blocksize & (blocksize - 1) == 0):
        return nf4_dequantize_reference(packed, quant_state, dtype)
    triton, kernel = _build_kernel()  # pragma: no cover - needs CUDA
    out = torch.empty(quant_state.shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    n_blocks = quant_state.absmax.numel()
    nested = bool(quant_state.nested)
    state2 = quant_state.state2 if nested else None
    per_program = max(1, 4096 // blocksize)
    launch = torch.library.wrap_triton(kernel) if traced else kernel
    launch[(triton.cdiv(n_blocks, per_program),)](
        packed,
        quant_state.absmax,
        state2.absmax if nested else quant_state.absmax,
        state2.code if nested else quant_state.code,
        quant_state.offset if nested else quant_state.absmax,
        quant_state.code,
        out,
        numel,
        n_blocks,
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=state2.blocksize if nested else 1,
        NESTED=nested,
        BLOCKS_PER_PROGRAM=per_program,
        num_warps=4,
    )
    return out


class _NF4Linear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized on the fly in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, quant_state: Any, bias: torch.Tensor | None):
        weight = nf4_dequantize(packed, quant_state).to(x.dtype)  # bitsandbytes' two roundings, if dtypes differ
        ctx.packed, ctx.quant_state = packed, quant_state
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ nf4_dequantize(ctx.packed, ctx.quant_state).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class _NF4LinearTraced(torch.autograd.Function):
    """:class:`_NF4Linear` for ``torch.compile``: the state as tensors and sizes, the dequantize as the custom op
    ``peft_balanced::nf4_dequantize`` in the forward and again in the backward. Dynamo traces this Function, so the
    matmuls are in the graph and only the dequantize kernel is opaque (no weight is saved for the backward)."""

    @staticmethod
    def forward(ctx, x, packed, code, absmax, absmax2, code2, offset, bias, blocksize, blocksize2, shape, dtype):
        state = (code, absmax, absmax2, code2, offset)
        weight = torch.ops.peft_balanced.nf4_dequantize(packed, *state, blocksize, blocksize2, shape, dtype)
        ctx.save_for_backward(packed, *(t for t in state if t is not None))
        ctx.sizes, ctx.nested, ctx.has_bias = (
            (blocksize, blocksize2, shape, dtype),
            absmax2 is not None,
            bias is not None,
        )
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, code, absmax, *rest = ctx.saved_tensors
        absmax2, code2, offset = rest if ctx.nested else (None, None, None)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = torch.ops.peft_balanced.nf4_dequantize(packed, code, absmax, absmax2, code2, offset, *ctx.sizes)
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[7]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, *([None] * 6), grad_bias, None, None, None, None)


def nf4_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a bitsandbytes ``Linear4bit`` NF4 ``module`` through :func:`nf4_dequantize` and cuBLAS.

    Mirrors ``Linear4bit.forward``: the input is cast to the layer's compute dtype and the output back to the input's.
    Eager calls run an ``autograd.Function``; under ``torch.compile`` dynamo traces the same math, with the
    dequantize kernel as the custom op ``peft_balanced::nf4_dequantize`` (an opaque ``dequantize + matmul`` op was
    measured slower: its per-call host overhead; docs/benchmarks.md).
    """
    weight = module.weight
    compute_dtype = module.compute_dtype or x.dtype
    bias = module.bias.to(compute_dtype) if module.bias is not None else None
    if TRITON_OPS and torch.compiler.is_compiling():
        code, absmax, absmax2, code2, offset, *sizes = _state_args(weight.quant_state)
        out = _NF4LinearTraced.apply(
            x.to(compute_dtype), weight.data, code, absmax, absmax2, code2, offset, bias, *sizes
        )
    else:
        out = _NF4Linear.apply(x.to(compute_dtype), weight.data, weight.quant_state, bias)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- custom ops
# A bitsandbytes QuantState is not a tensor: the ops take its tensors and sizes, and rebuild a state from them.


def _state_args(quant_state: Any) -> tuple:
    """``(code, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype)`` of a QuantState."""
    state2 = quant_state.state2 if quant_state.nested else None
    return (
        quant_state.code,
        quant_state.absmax,
        None if state2 is None else state2.absmax,
        None if state2 is None else state2.code,
        None if state2 is None else torch.as_tensor(quant_state.offset, device=quant_state.absmax.device),
        int(quant_state.blocksize),
        1 if state2 is None else int(state2.blocksize),
        [int(size) for size in quant_state.shape],
        quant_state.dtype,
    )


def _state(code, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype) -> SimpleNamespace:
    """A stand-in QuantState with the fields :func:`nf4_dequantize` reads."""
    nested = absmax2 is not None
    state2 = SimpleNamespace(absmax=absmax2, code=code2, blocksize=blocksize2) if nested else None
    return SimpleNamespace(
        code=code, absmax=absmax, nested=nested, state2=state2, offset=offset, blocksize=blocksize,
        shape=torch.Size(shape), dtype=dtype,
    )  # fmt: skip


def _nf4_dequantize_op(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`nf4_dequantize` on a state given as tensors: the weight ``shape`` in ``dtype``."""
    state = _state(code, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype)
    return nf4_dequantize(packed, state, traced=True)


if TRITON_OPS:
    define_triton_op("nf4_dequantize", _nf4_dequantize_op)


def uses_fast_nf4(module: nn.Module, x: torch.Tensor) -> bool:
    """True when :func:`nf4_linear` should replace ``module``'s own forward for input ``x``."""
    if not x.is_cuda or x.numel() <= MIN_TOKENS * x.shape[-1]:
        return False
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
    if quant_state is None or getattr(quant_state, "quant_type", None) != "nf4":
        return False
    if getattr(quant_state, "packing_format_for_cpu", False):
        return False
    return fast_nf4_allowed() and triton_available()
