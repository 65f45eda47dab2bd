"""``TileInt4Linear``: a frozen linear layer stored in the 2-D-tile INT4 format."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .kernels import route
from .spec import TileInt4Spec, resolve_spec
from .tile_int4 import DEFAULT_ZERO_DTYPE, TileInt4Weight, check_tile_shape, dtype_name, quantize_tiles

__all__ = ["TileInt4Linear"]

_LOOSE_DEFAULTS = {"scale_dtype": torch.float16, "zero_dtype": DEFAULT_ZERO_DTYPE}  # of __init__ and from_linear


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type`` if autocast is on (dequantize straight into it), else ``None``."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 or a device type without autocast
        pass
    return None


class TileInt4Linear(nn.Module):
    """Frozen ``y = x W~^T + b`` with ``W~ = alpha * q + beta`` on ``l1 x l2`` tiles (see ``tile_int4``).

    Buffers (all persistent, so they are in ``state_dict`` and in safetensors checkpoints):

    * ``qweight``: ``uint8 (out_features, in_features // 2)``, two 4-bit codes per byte.
    * ``scale`` (alpha) and ``zero`` (beta): ``(out_features // l2, in_features // l1)`` in ``scale_dtype`` and
      ``zero_dtype`` (default float32, as everywhere in the package; ``None``: the scale's dtype).
    * ``bias``: ``(out_features,)`` or ``None``.

    The module has no parameters: nothing in it trains, and gradients flow to its input only. ``zero`` can be
    shifted per tile with :meth:`add_to_zero` (the QA-BLoRA merge). Module casts (``.to(dtype)``, ``.half()``)
    move but never re-round ``scale``/``zero``: the quantized format is kept bit-exact; ``bias`` and
    ``compute_dtype`` follow the cast.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tile: TileInt4Spec | tuple[int, int] = (4, 8),
        bias: bool = True,
        scale_dtype: torch.dtype | str = torch.float16,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str | None = None,
        zero_dtype: torch.dtype | str | None = DEFAULT_ZERO_DTYPE,
    ) -> None:
        """``tile`` is a :class:`TileInt4Spec` (then ``scale_dtype`` / ``zero_dtype`` must keep their defaults) or
        the tile of one built from ``tile``, ``scale_dtype`` and ``zero_dtype`` (``None``: the scale's dtype)."""
        super().__init__()
        spec = resolve_spec(tile, _LOOSE_DEFAULTS, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
        check_tile_shape(out_features, in_features, spec.tile, name)
        self.in_features = in_features
        self.out_features = out_features
        self.tile = spec.tile
        self.compute_dtype = compute_dtype or torch.get_default_dtype()
        l1, l2 = spec.tile
        grid = (out_features // l2, in_features // l1)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(grid, dtype=spec.scale_dtype, device=device))
        self.register_buffer("zero", torch.zeros(grid, dtype=spec.zero_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=self.compute_dtype, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        tile: TileInt4Spec | tuple[int, int] = (4, 8),
        scale_dtype: torch.dtype | str = torch.float16,
        name: str | None = None,
        zero_dtype: torch.dtype | str | None = DEFAULT_ZERO_DTYPE,
    ) -> TileInt4Linear:
        """Quantize ``linear.weight`` (round-to-nearest) into a new module on the same device.

        ``tile`` is a :class:`TileInt4Spec` or a tile (then with ``scale_dtype`` and ``zero_dtype``, ``None``: the
        scale's dtype). ``compute_dtype`` is ``linear.weight.dtype``; ``bias`` is copied unchanged. ``name`` appears
        in errors.
        """
        spec = resolve_spec(tile, _LOOSE_DEFAULTS, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            spec,
            bias=linear.bias is not None,
            compute_dtype=weight.dtype,
            device=weight.device,
            name=name,
        )
        packed, scale, zero = quantize_tiles(weight, module.tile, module.scale.dtype, name, module.zero.dtype)
        module.qweight.copy_(packed)
        module.scale.copy_(scale)
        module.zero.copy_(zero)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> TileInt4Spec:
        """The format of this layer (``skip_modules`` / ``skip_indivisible`` are model-level and left empty)."""
        return TileInt4Spec(self.tile, self.scale.dtype, self.zero.dtype, skip_modules=())

    @property
    def packed_weight(self) -> TileInt4Weight:
        """The weight as the kernels read it (the buffers themselves, not copies)."""
        return TileInt4Weight(self.qweight, self.scale, self.zero, self.tile)

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def zero_dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def tile_grid(self) -> tuple[int, int]:
        """Shape of ``scale``/``zero``: ``(out_features // l2, in_features // l1)``."""
        return self.out_features // self.tile[1], self.in_features // self.tile[0]

    def bits_per_weight(self) -> float:
        """Storage bits per weight: 4 + (bits(alpha) + bits(beta)) / (l1 * l2).

        4x8 tiles: 5.0 with fp16 scale and zero, 5.5 with an fp16 scale and an fp32 zero, 6.0 with both fp32.
        """
        l1, l2 = self.tile
        return 4.0 + (self.scale.element_size() + self.zero.element_size()) * 8 / (l1 * l2)

    # ------------------------------------------------------------------ math
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Full weight ``W~`` of shape ``(out_features, in_features)`` in ``dtype`` (default ``compute_dtype``)."""
        return route.dequantize(self.packed_weight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type) or (x.dtype if x.is_floating_point() else self.compute_dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        param_grad = self.scale.requires_grad or self.zero.requires_grad or (bias is not None and bias.requires_grad)
        return route.tile_int4_linear(x, self.packed_weight, bias, dtype, param_grad)

    @torch.no_grad()
    def add_to_zero(self, delta: torch.Tensor) -> None:
        """In place ``zero += delta`` (one shift per tile), rounded once into ``zero``'s dtype.

        ``delta`` must have shape ``(out_features // l2, in_features // l1)``; for QA-BLoRA it is ``s * H / l1``.
        The sum is formed in float32 and rounded to ``zero.dtype``, so the result is the correctly rounded
        ``beta + delta``; note that subtracting the same ``delta`` later need not restore ``beta`` bit-exactly.
        """
        if not isinstance(delta, torch.Tensor):
            raise TypeError(f"add_to_zero expects a tensor, got {type(delta).__name__}")
        if tuple(delta.shape) != self.tile_grid:
            raise ValueError(
                f"add_to_zero: delta must have shape (out_features // l2, in_features // l1) = {self.tile_grid} "
                f"for a ({self.out_features}, {self.in_features}) weight with tile={self.tile}, "
                f"got {tuple(delta.shape)}"
            )
        new = self.zero.float() + delta.detach().to(device=self.zero.device, dtype=torch.float32)
        if not bool(torch.isfinite(new).all()):
            raise ValueError("add_to_zero: result is not finite")
        self.zero.copy_(new.to(self.zero.dtype))

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TileInt4Linear:
        # Apply `fn` for its device effect only to the quantized state: a dtype cast must not re-round alpha/beta.
        order = list(self._buffers)
        kept = {key: self._buffers.pop(key) for key in ("scale", "zero")}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.qweight.device
            for key, value in kept.items():
                if value.device != device:
                    kept[key] = torch.empty_like(value, device=device) if value.is_meta else value.to(device)
            buffers = {**self._buffers, **kept}
            self._buffers.clear()
            self._buffers.update({key: buffers[key] for key in order})
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"tile={self.tile}, scale_dtype={dtype_name(self.scale.dtype)}, zero_dtype={dtype_name(self.zero.dtype)}, "
            f"compute_dtype={dtype_name(self.compute_dtype)}"
        )
