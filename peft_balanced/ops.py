"""The shared math of balanced adapters: pooling inputs and expanding outputs over blocks of features.

Every tuner in this package uses these functions; nothing else re-implements them.

Conventions (torch): a weight has shape ``(D_out, D_in)`` and ``y = x @ W.T``.

* ``pool(x, k)[..., m] = mean(x[..., m*k:(m+1)*k])`` maps ``(..., D)`` to ``(..., D/k)``.
* ``expand(z, k)[..., j] = z[..., j // k]`` maps ``(..., D)`` to ``(..., D*k)``.
* ``expand_blocks(M, k_out, k_in)`` repeats every entry of a ``(D_out/k_out, D_in/k_in)`` matrix over a
  ``k_out x k_in`` block, giving ``(D_out, D_in)``.

For a small matrix ``M`` of shape ``(D_out/k_out, D_in/k_in)``,
``expand(pool(x, k_in) @ M.T, k_out) == x @ (expand_blocks(M, k_out, k_in) / k_in).T``, which is what makes the
merge of a balanced adapter exact.
"""

from __future__ import annotations

import contextlib

import torch


def group_sum(x: torch.Tensor, factor: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum consecutive groups of ``factor`` features: ``(..., D) -> (..., D // factor)``, in ``dtype`` (default
    ``x``'s), with one rounding as ``Tensor.sum(dtype=...)``.

    ``factor == 2`` into an equal or wider dtype is one strided elementwise add (a reduction over an innermost
    dimension of 2 runs far below bandwidth on CUDA); its value equals the reduction's: two terms, rounded once.
    """
    if factor == 1:
        return x if dtype is None else x.to(dtype)
    _check_divisible(x, factor, "sum")
    if factor == 2 and _widens(x, dtype):
        even = x[..., 0::2]
        return (even if dtype is None else even.to(dtype)) + x[..., 1::2]
    return x.unflatten(-1, (-1, factor)).sum(dim=-1, dtype=dtype)


def pool(x: torch.Tensor, factor: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Average consecutive groups of ``factor`` features: ``(..., D) -> (..., D // factor)``.

    With ``dtype``, the input is read as ``dtype`` and the mean computed and returned in it, in one pass (no cast copy
    of the full-width input). ``factor == 2`` into an equal or wider dtype halves :func:`group_sum` (exact: a power
    of two), so it equals the mean for every result above the dtype's subnormal range.
    """
    if factor == 1:
        return x if dtype is None else x.to(dtype)
    _check_divisible(x, factor, "pool")
    if factor == 2 and _widens(x, dtype):
        return group_sum(x, 2, dtype) * 0.5
    return x.unflatten(-1, (-1, factor)).mean(dim=-1, dtype=dtype)


def _widens(x: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether ``dtype`` holds ``x``'s values exactly (the strided fast paths; a narrowing keeps the reductions, whose
    rounding of the inputs differs between ``sum`` and ``mean``)."""
    return dtype is None or torch.promote_types(dtype, x.dtype) == dtype


def _check_divisible(x: torch.Tensor, factor: int, verb: str) -> None:
    if x.shape[-1] % factor:
        raise ValueError(
            f"Cannot {verb} {x.shape[-1]} features by {factor}: {x.shape[-1]} is not a multiple of {factor}."
        )


def expand(z: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat every feature ``factor`` times in place: ``(..., D) -> (..., D * factor)``."""
    if factor == 1:
        return z
    return z.unsqueeze(-1).expand(*z.shape, factor).flatten(-2)


def add_expanded(base: torch.Tensor, z: torch.Tensor, factor: int) -> torch.Tensor:
    """``base + expand(z, factor)`` in ``base``'s dtype without materializing the expansion.

    ``base: (..., D * factor)``, ``z: (..., D)``. ``z`` is rounded to ``base``'s dtype first, exactly as
    ``base + expand(z, factor).to(base.dtype)`` would; the backward sums the gradient over each group in one pass.
    """
    if factor == 1:
        return base + z.to(base.dtype)
    return (base.unflatten(-1, (-1, factor)) + z.to(base.dtype).unsqueeze(-1)).flatten(-2)


def expand_blocks(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Repeat each entry of ``matrix`` over a ``rows x cols`` block: ``(R, C) -> (R * rows, C * cols)``."""
    out = matrix
    if rows != 1:
        out = out.repeat_interleave(rows, dim=0)
    if cols != 1:
        out = out.repeat_interleave(cols, dim=1)
    return out


def _compute_dtype(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.dtype:
    """The dtype of the small products: the autocast dtype under autocast (as ``nn.Linear``'s), else the weights'."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weights[0].dtype


def _autocast_off(device_type: str):
    """``autocast(enabled=False)`` where autocast is on; nothing (no context-manager cost per call) where it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _balanced_forward(base, x, weights, scaling, k_in, k_out, compute_dtype):
    """``(out, hidden, cast)``: the fused add, the small activations ``[pool(x), W_1 pool(x), …]`` (``n`` of them,
    the last product excluded) and the weights cast to ``compute_dtype``. Autocast is off inside."""
    with _autocast_off(x.device.type):
        cast = [weight.to(compute_dtype) for weight in weights]
        hidden = [pool(x, k_in, dtype=compute_dtype)]
        for weight in cast:
            hidden.append(torch.nn.functional.linear(hidden[-1], weight))
        small = hidden.pop() * scaling
        out = add_expanded(base, small, k_out)
    return out, hidden, cast


def _balanced_backward(grad, hidden, cast, scaling, k_in, k_out, x_dtype, weight_dtypes, needs_x, needs_weights):
    """``(grad_x, [grad_W_i])`` of :func:`_balanced_forward` for the output gradient ``grad: (..., D_out)``."""
    n = len(cast)
    grad_small = group_sum(grad, k_out, cast[-1].dtype) * scaling
    grad_weights = [None] * n
    for i in reversed(range(n)):
        if needs_weights[i]:
            grad_weight = grad_small.flatten(0, -2).T @ hidden[i].flatten(0, -2)
            grad_weights[i] = grad_weight.to(weight_dtypes[i])
        grad_small = grad_small @ cast[i]
    grad_x = expand((grad_small / k_in).to(x_dtype), k_in) if needs_x else None
    return grad_x, grad_weights


class _BalancedAdd(torch.autograd.Function):
    """``base + expand_k_out(s · pool_k_in(x) Wᵀ…)`` as one autograd node (see :func:`add_balanced_adapter`)."""

    @staticmethod
    def forward(ctx, base, x, scaling, k_in, k_out, *weights):
        # Under autocast the small products run in the autocast dtype, as nn.Linear's would; the backward then
        # returns each weight's gradient in that weight's own dtype (e.g. fp32 master weights).
        out, hidden, cast = _balanced_forward(base, x, weights, scaling, k_in, k_out, _compute_dtype(x, weights))
        ctx.save_for_backward(*hidden, *cast)
        ctx.scaling, ctx.k_in, ctx.k_out, ctx.x_dtype, ctx.n = scaling, k_in, k_out, x.dtype, len(weights)
        ctx.weight_dtypes = [weight.dtype for weight in weights]
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        hidden, cast = saved[: ctx.n], saved[ctx.n :]
        grad_x, grad_weights = _balanced_backward(
            grad, hidden, cast, ctx.scaling, ctx.k_in, ctx.k_out, ctx.x_dtype, ctx.weight_dtypes,
            ctx.needs_input_grad[1], ctx.needs_input_grad[5:],
        )  # fmt: skip
        return grad, grad_x, None, None, None, *grad_weights


def add_balanced_adapter(
    base: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], scaling: float, k_in: int, k_out: int
) -> torch.Tensor:
    """``base + expand(s · W_n(… W_1 pool(x)), k_out)`` in one autograd node, in ``base``'s dtype.

    ``x: (..., D_in)`` is pooled by ``k_in`` straight into the weights' dtype, multiplied by ``weights`` in order
    (BLoRA: ``[A, B]``, QA-BLoRA: ``[H]``), scaled, rounded to ``base``'s dtype and added to ``base: (..., D_out)``
    without materializing the expansion. Forward values equal the unfused ops; the backward keeps the small
    activations only (``pool(x)`` and the intermediate products) and sums gradients over groups in the weights'
    dtype. One node instead of a dozen keeps the per-layer host overhead low.

    Under ``torch.compile`` dynamo traces this ``autograd.Function``, forward and backward, without a graph break,
    so inductor fuses the pooling, the expansion and the group sums with their neighbours (an opaque custom op here
    was measured slower; docs/benchmarks.md). When no backward can follow (grad mode off, or no input requiring grad) it
    runs the same ops outside the ``autograd.Function``: nothing is saved, and dynamo with dynamic shapes traces it
    (it fails on the Function there: the float ``scaling`` takes the place of ``x``).
    """
    tensors = (base, x, *weights)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):  # no backward: no autograd node
        return _balanced_forward(base, x, weights, scaling, k_in, k_out, _compute_dtype(x, weights))[0]
    return _BalancedAdd.apply(base, x, scaling, k_in, k_out, *weights)
