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

import torch


def check_factor(name: str, factor: object) -> int:
    """Validate a pooling/expansion factor: a positive ``int`` (``bool`` is rejected)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
        raise ValueError(f"{name} must be a positive integer, got {factor!r} ({type(factor).__name__}).")
    return factor


def pool(x: torch.Tensor, factor: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Average consecutive groups of ``factor`` features: ``(..., D) -> (..., D // factor)``.

    With ``dtype``, the input is read as ``dtype`` and the mean computed and returned in it, in one pass (no cast copy
    of the full-width input).
    """
    if factor == 1:
        return x if dtype is None else x.to(dtype)
    if x.shape[-1] % factor:
        raise ValueError(
            f"Cannot pool {x.shape[-1]} features by {factor}: {x.shape[-1]} is not a multiple of {factor}."
        )
    return x.unflatten(-1, (-1, factor)).mean(dim=-1, dtype=dtype)


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
