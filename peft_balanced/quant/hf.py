"""transformers integration: ``TileInt4Config`` + ``TileInt4HfQuantizer`` registered as quant method ``"tile_int4"``.

* ``AutoModelForCausalLM.from_pretrained(path, quantization_config=TileInt4Config(...))`` quantizes while loading:
  each linear is swapped for a meta ``TileInt4Linear`` before the weights are read, and each checkpoint weight is
  quantized as it arrives (the full-precision model never exists in memory).
* ``save_pretrained`` writes ``qweight``/``scale``/``zero`` to safetensors and ``quantization_config`` to config.json;
  ``from_pretrained(path)`` (after ``import peft_balanced.quant``) swaps exactly the linears that have a ``qweight``
  in the checkpoint and loads the buffers as they are: bit-exact.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import ConversionOps, HfQuantizer, assign_is_quantized, get_module_from_name
from ..utils import linear_from_weight, set_submodule
from ..validation import check_flag
from .linear import TileInt4Linear
from .select import check_skip_modules_match, iter_quantizable_linears
from .spec import TileInt4Spec
from .tile_int4 import DEFAULT_ZERO_DTYPE, dtype_name, quantize_tiles

__all__ = [
    "QUANT_METHOD",
    "TileInt4Config",
    "TileInt4HfQuantizer",
    "attach_quantization_config",
    "register_tile_int4",
    "tied_module_names",
]

QUANT_METHOD = "tile_int4"


class TileInt4Config(QuantizationConfigMixin):
    """Quantization config for the 2-D-tile INT4 format (``quant_method="tile_int4"``).

    Args:
        tile: ``(l1, l2)``: ``l1`` input features x ``l2`` output features share one scale and zero point.
        skip_modules: linears kept in full precision, matched by module-name suffix.
        scale_dtype: storage dtype of the scales: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        skip_indivisible: keep linears whose shape does not fit ``tile`` instead of raising.
        zero_dtype: storage dtype of the zero points: ``"float32"`` (default, exact QA-BLoRA merges; see
            ``quantize_model``), ``"float16"`` or ``"bfloat16"``; ``None`` means ``scale_dtype``. A saved config
            without this field (written before it existed) means ``scale_dtype``.
    """

    def __init__(
        self,
        tile: tuple[int, int] | list[int] = (4, 8),
        skip_modules: Iterable[str] | None = ("lm_head",),
        scale_dtype: str | torch.dtype = "float16",
        skip_indivisible: bool = False,
        zero_dtype: str | torch.dtype | None = DEFAULT_ZERO_DTYPE,
        quant_method: str = QUANT_METHOD,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"TileInt4Config.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        check_flag("TileInt4Config.skip_indivisible", skip_indivisible)
        spec = TileInt4Spec(tile, scale_dtype, zero_dtype, skip_modules, skip_indivisible)
        self.tile = spec.tile
        self.skip_modules = list(spec.skip_modules)
        self.scale_dtype = dtype_name(spec.scale_dtype)
        self.skip_indivisible = spec.skip_indivisible
        self.zero_dtype = dtype_name(spec.zero_dtype)

    @classmethod
    def from_spec(cls, spec: TileInt4Spec) -> TileInt4Config:
        """The transformers config of ``spec``."""
        return cls(spec.tile, spec.skip_modules, spec.scale_dtype, spec.skip_indivisible, spec.zero_dtype)

    @property
    def spec(self) -> TileInt4Spec:
        """This config as a :class:`TileInt4Spec` (the object the rest of the package takes)."""
        return TileInt4Spec(self.tile, self.scale_dtype, self.zero_dtype, self.skip_modules, self.skip_indivisible)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """As transformers', except that a dict without ``zero_dtype`` (saved before the field existed, when the
        zero points were stored in the scale's dtype) means ``zero_dtype=None``, and fields this version does not
        know (saved by a newer one) are dropped with a warning; a misspelled keyword to ``__init__`` raises."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            warnings.warn(
                f"TileInt4Config: ignoring fields {unknown} of a saved quantization_config (written by a newer "
                f"peft-balanced?); this version knows {sorted(known)}",
                stacklevel=2,
            )
        config_dict = {"zero_dtype": None, **{k: v for k, v in config_dict.items() if k in known}}
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return self.spec.scale_dtype

    @property
    def torch_zero_dtype(self) -> torch.dtype:
        return self.spec.zero_dtype

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.spec.to_dict()}


class TileInt4Quantize(ConversionOps):
    """Load-time op: a checkpoint ``<module>.weight`` -> ``<module>.qweight``, ``.scale``, ``.zero``."""

    def __init__(self, hf_quantizer: TileInt4HfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, Any] = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, tensor_name = key.rpartition(".")
            module = model.get_submodule(module_name) if model is not None else None
            if not (isinstance(module, TileInt4Linear) and tensor_name == "weight"):
                out[key] = value
                continue
            packed, scale, zero = quantize_tiles(
                value, module.tile, module.scale.dtype, module_name, module.zero.dtype
            )
            module._parameters.pop("weight", None)  # drop the meta placeholder
            if missing_keys is not None:
                missing_keys.discard(key)
            out[f"{module_name}.qweight"] = packed
            out[f"{module_name}.scale"] = scale
            out[f"{module_name}.zero"] = zero
        return out


def _checkpoint_scale_shapes(checkpoint_files: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``{module name: shape of its scale}`` for the modules with a ``qweight`` in safetensors ``checkpoint_files``;
    ``None`` if not readable."""
    if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        return None
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in keys:
                if key.endswith(".qweight"):
                    name = key.removesuffix(".qweight")
                    scale = f"{name}.scale"
                    shapes[name] = tuple(handle.get_slice(scale).get_shape()) if scale in keys else ()
    return shapes


def _check_checkpoint_tile(linear: nn.Module, name: str, scale_shape: tuple[int, ...], tile: tuple[int, int]) -> None:
    """Raise a ``ValueError`` naming both tiles if the checkpoint's scale of module ``name`` is not the ``tile`` grid
    that ``config.json`` says (transformers would report a bare size mismatch)."""
    l1, l2 = tile
    expected = (linear.out_features // l2, linear.in_features // l1)
    if not scale_shape or tuple(scale_shape) == expected:
        return
    rows, cols = scale_shape
    found = (
        f"tile=({linear.in_features // cols}, {linear.out_features // rows})"
        if rows and cols and linear.out_features % rows == 0 and linear.in_features % cols == 0
        else "no tile of this layer"
    )
    raise ValueError(
        f"tile_int4 checkpoint: config.json's quantization_config says tile={tile}, but the tensors of {name!r} "
        f"({linear.in_features} -> {linear.out_features} features) have a scale of shape {tuple(scale_shape)}, which "
        f"is {found}; expected {expected}. The config.json was edited or belongs to another checkpoint: restore it, "
        "or save the model again."
    )


def tied_module_names(model: nn.Module) -> list[str]:
    """Modules whose weight is tied (e.g. ``lm_head`` to the embeddings): quantizing them would break the tie."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied) | set(tied.values())
    return sorted(k.removesuffix(".weight") for k in keys)


def _checkpoint_name(name: str, names: Iterable[str], prefix: str) -> str | None:
    """The name module ``name`` has among the checkpoint's ``names`` (with or without the model's ``prefix``)."""
    candidates = (name, name.removeprefix(prefix + ".") if prefix else name, f"{prefix}.{name}")
    return next((candidate for candidate in candidates if candidate in names), None)


class TileInt4HfQuantizer(HfQuantizer):
    """transformers quantizer for ``TileInt4Config`` (on-the-fly quantization and pre-quantized loading)."""

    requires_calibration = False
    quantization_config: TileInt4Config

    @property
    def is_compileable(self) -> bool:
        """``generate(cache_implementation="static")`` may compile the decode step: the kernels are ``torch.library``
        ops, so the quantized layers trace without graph breaks."""
        return True

    @property
    def quantized_element_size(self) -> float:
        return self.quantization_config.spec.bits_per_weight() / 8

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        spec = self.quantization_config.spec
        selected = None
        if self.pre_quantized:
            scale_shapes = _checkpoint_scale_shapes(checkpoint_files)
            if scale_shapes is not None:
                prefix = getattr(model, "base_model_prefix", "")
                every_fitting = dataclasses.replace(spec, skip_modules=(), skip_indivisible=True)
                selected = []
                for name, linear in iter_quantizable_linears(model, every_fitting):
                    key = _checkpoint_name(name, scale_shapes, prefix)
                    if key is not None:
                        _check_checkpoint_tile(linear, name, scale_shapes[key], spec.tile)
                        selected.append((name, linear))
                if scale_shapes and not selected:  # checkpoint keys are renamed on load: use the config's rule
                    selected = None
        if selected is None:
            check_skip_modules_match(model, spec.skip_modules, default=("lm_head",))
            also_skip = list(getattr(model, "_keep_in_fp32_modules", None) or []) + tied_module_names(model)
            selected = list(iter_quantizable_linears(model, spec, also_skip))
        for name, linear in selected:
            module = TileInt4Linear(
                linear.in_features,
                linear.out_features,
                spec,
                bias=linear.bias is not None,
                compute_dtype=linear.weight.dtype,
                device="meta",
                name=name,
            )
            if linear.bias is not None:
                module.bias = torch.empty_like(linear.bias, device="meta")
            if not self.pre_quantized:  # placeholder that receives the checkpoint weight, see TileInt4Quantize
                module.weight = nn.Parameter(torch.empty_like(linear.weight, device="meta"), requires_grad=False)
            set_submodule(model, name, module)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, TileInt4Linear) and tensor_name == "weight"

    def get_quantize_ops(self) -> TileInt4Quantize:
        return TileInt4Quantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, TileInt4Linear):
                module._parameters.pop("weight", None)
        return model

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, TileInt4Linear):
                weight = module.dequantize(dtype or module.compute_dtype)
                set_submodule(model, name, linear_from_weight(weight, module.bias, trainable=True))
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False


def attach_quantization_config(model: nn.Module, spec: TileInt4Spec) -> None:
    """Make a transformers model quantized by ``quantize_model`` look as if loaded with ``TileInt4Config``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, TileInt4HfQuantizer):
        warnings.warn(
            f"model already has a {type(existing).__name__}; its quantization_config is kept, so save_pretrained "
            "will not record the tile_int4 layers",
            stacklevel=3,
        )
        return
    config = TileInt4Config.from_spec(spec)
    model.config.quantization_config = config
    model.hf_quantizer = TileInt4HfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    assign_is_quantized(model)


def _register_into(mapping: dict, key: str, cls: type, decorator_factory) -> None:
    existing = mapping.get(key)
    if existing is None:
        decorator_factory(key)(cls)
    elif existing is cls:
        return
    elif getattr(existing, "__qualname__", None) == cls.__qualname__ and existing.__module__ == cls.__module__:
        mapping[key] = cls  # this module was reloaded: point at the new class
    else:
        raise RuntimeError(
            f"quantization method {key!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )


def register_tile_int4() -> None:
    """Register ``"tile_int4"`` with transformers' quantizer registry. Idempotent (safe under ``importlib.reload``)."""
    from transformers.quantizers import auto

    _register_into(
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, TileInt4Config, auto.register_quantization_config
    )
    _register_into(auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD, TileInt4HfQuantizer, auto.register_quantizer)
