"""``TileInt4Linear``: a frozen linear layer stored in the 2-D-tile INT4 format, and ``quantize_model``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .gemv import fused_linear, use_gemv
from .kernels import _triton_available, triton_dequantize_tiles
from .tile_int4 import (
    DEFAULT_ZERO_DTYPE,
    check_tile,
    check_tile_shape,
    dequantize_tiles,
    dtype_name,
    quantize_tiles,
    resolve_scale_dtype,
    resolve_zero_dtype,
)

__all__ = ["TileInt4Linear", "iter_quantizable_linears", "quantize_model"]


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
      ``zero_dtype`` (``None``: the scale's dtype).
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
        tile: tuple[int, int] = (4, 8),
        bias: bool = True,
        scale_dtype: torch.dtype | str = torch.float16,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        name: str | None = None,
        zero_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        tile = check_tile(tile)
        check_tile_shape(out_features, in_features, tile, name)
        scale_dtype = resolve_scale_dtype(scale_dtype)
        zero_dtype = scale_dtype if zero_dtype is None else resolve_zero_dtype(zero_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.tile = tile
        self.compute_dtype = compute_dtype or torch.get_default_dtype()
        l1, l2 = tile
        grid = (out_features // l2, in_features // l1)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(grid, dtype=scale_dtype, device=device))
        self.register_buffer("zero", torch.zeros(grid, dtype=zero_dtype, device=device))
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
        tile: tuple[int, int] = (4, 8),
        scale_dtype: torch.dtype | str = torch.float16,
        name: str | None = None,
        zero_dtype: torch.dtype | str | None = None,
    ) -> TileInt4Linear:
        """Quantize ``linear.weight`` (round-to-nearest) into a new module on the same device.

        ``compute_dtype`` is ``linear.weight.dtype``; ``bias`` is copied unchanged. ``name`` appears in errors;
        ``zero_dtype=None`` stores the zero points in ``scale_dtype``.
        """
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            tile=tile,
            bias=linear.bias is not None,
            scale_dtype=scale_dtype,
            compute_dtype=weight.dtype,
            device=weight.device,
            name=name,
            zero_dtype=zero_dtype,
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
        dtype = dtype or self.compute_dtype
        if self.qweight.is_cuda and _triton_available():
            return triton_dequantize_tiles(self.qweight, self.scale, self.zero, self.tile, dtype)
        return dequantize_tiles(self.qweight, self.scale, self.zero, self.tile, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type) or (x.dtype if x.is_floating_point() else self.compute_dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        tokens = x.numel() // self.in_features if self.in_features else 0
        param_grad = self.scale.requires_grad or self.zero.requires_grad or (bias is not None and bias.requires_grad)
        if use_gemv(tokens, self.tile, dtype, x.device.type, x.is_cuda and _triton_available(), param_grad):
            return fused_linear(x.to(dtype), self.qweight, self.scale, self.zero, self.tile, bias)  # few tokens
        weight = self.dequantize(dtype)
        return F.linear(x, weight, bias)

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


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` holding a plain float weight (not bnb/other quantized subclasses, not MHA's out_proj)."""
    if not isinstance(module, nn.Linear) or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    weight = getattr(module, "weight", None)
    return type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``True`` if module ``name`` equals a pattern or ends with ``"." + pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def iter_quantizable_linears(
    model: nn.Module,
    tile: tuple[int, int],
    skip_modules: Iterable[str] = ("lm_head",),
    skip_indivisible: bool = False,
) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(name, linear)`` for every ``nn.Linear`` of ``model`` that :func:`quantize_model` replaces.

    Skips modules whose name matches ``skip_modules`` by suffix; a linear whose shape does not fit ``tile`` raises a
    ``ValueError`` naming it, or is skipped when ``skip_indivisible``. The list is materialised before yielding so the
    caller may replace modules while iterating.
    """
    tile = check_tile(tile)
    skip_modules = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules or ())
    selected = []
    for name, module in model.named_modules():
        if not _is_plain_linear(module):
            continue
        if _matches(name, skip_modules):
            continue
        try:
            check_tile_shape(module.out_features, module.in_features, tile, name)
        except ValueError as err:
            if skip_indivisible:
                continue
            raise ValueError(f"{err}. Add it to skip_modules or pass skip_indivisible=True.") from None
        selected.append((name, module))
    yield from selected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    tile: tuple[int, int] = (4, 8),
    skip_modules: Iterable[str] = ("lm_head",),
    scale_dtype: torch.dtype | str = torch.float16,
    skip_indivisible: bool = False,
    zero_dtype: torch.dtype | str | None = DEFAULT_ZERO_DTYPE,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` by a :class:`TileInt4Linear`; returns ``model``.

    Args:
        model: any module; a transformers ``PreTrainedModel`` also gets a ``TileInt4Config`` as its
            ``config.quantization_config`` and a quantizer, so that ``save_pretrained`` writes a checkpoint that
            ``from_pretrained(path)`` reloads bit-exactly.
        tile: ``(l1, l2)`` input x output features per tile.
        skip_modules: module names kept in full precision, matched by suffix (``"lm_head"`` matches
            ``"model.lm_head"``). Linears with tied weights (transformers ``all_tied_weights_keys``) are kept too.
        scale_dtype: storage dtype of the scales (alpha).
        skip_indivisible: keep linears whose shape does not fit ``tile`` instead of raising.
        zero_dtype: storage dtype of the zero points (beta); ``None`` means ``scale_dtype``. The default float32
            keeps QA-BLoRA merges (which shift beta) at float32 precision for 16 more bits per tile than fp16 (4x8
            tiles: 5.5 instead of 5.0 bits per weight); fp16 beta costs ~1e-3 relative error in merged logits (see
            ``DEFAULT_ZERO_DTYPE``). GGUF Q4_1 export needs ``"float16"``.
    """
    tile = check_tile(tile)
    scale_dtype = resolve_scale_dtype(scale_dtype)
    zero_dtype = scale_dtype if zero_dtype is None else resolve_zero_dtype(zero_dtype)
    skip_modules = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules or ())
    from .hf import _tied_module_names, attach_quantization_config  # local import: transformers stays optional here

    skip = skip_modules + _tied_module_names(model)
    targets = list(iter_quantizable_linears(model, tile, skip, skip_indivisible))
    if not targets and isinstance(model, nn.Linear):
        raise ValueError("quantize_model expects a model containing linears; use TileInt4Linear.from_linear")
    for name, linear in targets:
        _set_submodule(model, name, TileInt4Linear.from_linear(linear, tile, scale_dtype, name, zero_dtype))
    attach_quantization_config(model, tile, skip_modules, scale_dtype, skip_indivisible, zero_dtype)
    return model
