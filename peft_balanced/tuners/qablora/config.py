"""Configuration of QA-BLoRA, the quantization-aware balanced adapter whose merge keeps the model 4-bit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from ...validation import check_flag, check_tile
from ..base_config import AdapterConfig

# lora_alpha values at or above this look carried over from a LoRA config (alpha = r or 2r: 8, 16, 32, ...).
LORA_LIKE_ALPHA = 8


@dataclass
class QABLoRAConfig(AdapterConfig):
    """Configuration of a :class:`QABLoRAModel`.

    Every targeted layer must be a :class:`~peft_balanced.quant.TileInt4Linear` quantized with the same ``tile``
    (quantize first with ``peft_balanced.quant.quantize_model(model, tile=...)`` or load with
    ``quantization_config=TileInt4Config(tile=...)``). Each gets one matrix ``H: (D_out/λ2, D_in/λ1)``:
    ``y = W~ x + s · expand_λ2(H pool_λ1(dropout(x)))``, i.e. ``ΔW[j, i] = s · H[j//λ2, i//λ1] / λ1``, a constant on
    every quantization tile. Merging therefore only shifts each tile's zero point, ``β ← β + s·H/λ1``, and the merged
    model is still 4-bit. The new β is rounded once into the base's zero-point dtype: float32 (the default of
    ``quantize_model`` / ``TileInt4Config``) keeps merged logits within ~2e-6 of the attached adapter's; float16 β
    costs 1e-3 to 1e-2 on SmolLM2 (``benchmarks/studies/qablora_merge_error.py``).

    Scaling: ``s = lora_alpha`` (default 1.0), **not** LoRA's ``lora_alpha / r``. There is no rank (``H`` is a full
    matrix on the tile grid), so there is nothing to divide by; ``lora_alpha=1`` gives ``ΔW = H / λ1`` per weight.
    A LoRA-style value (``lora_alpha=32``) makes the update 32 times larger; values >= 8 therefore warn.

    Args:
        tile: ``(λ1, λ2)``: λ1 input features x λ2 output features per tile; must equal the base's tile.
        lora_alpha: The scaling ``s`` itself (default 1.0; not divided by a rank).
        lora_dropout: Dropout probability applied to the adapter input (training only).
        target_modules: Module names (list: exact or suffix match; str: regex) or ``"all-linear"`` (every
            ``TileInt4Linear`` except the output layer; linears kept in full precision are left alone).
        exclude_modules: Module names (same syntax) never to adapt.
        layers_to_transform / layers_pattern: Restrict adaptation to some layer indices.
        bias: ``"none"`` or ``"all"`` (train every bias parameter of the model).
        modules_to_save: Extra modules trained fully and stored in the checkpoint.
        trainable_token_indices: Token indices whose embeddings are trained (peft's TrainableTokens).
        init_weights: ``True``: ``H = 0`` (model unchanged at initialization); ``False``: random ``H`` (for tests).
        use_lora_lr: Multiply ``s`` by λ1, which undoes the average pool's ``1/λ1`` (``ΔW = s·H`` per weight), so
            that a learning rate tuned for LoRA also suits QA-BLoRA. Under Adam this is the same as training at λ1
            times the learning rate. ``False`` keeps ``s = lora_alpha``. Measured in docs/accuracy.md.
    """

    PEFT_TYPE_NAME: ClassVar[str] = "QABLORA"

    tile: tuple[int, int] = field(
        default=(4, 8), metadata={"help": "(λ1, λ2): input x output features per tile; must match the 4-bit base."}
    )
    lora_alpha: float = field(default=1.0, metadata={"help": "Scaling s of the adapter output (s = lora_alpha)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex to adapt, or 'all-linear' (every TileInt4Linear but the head)."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: H = 0 (no change at init). False: random H (for tests)."}
    )
    use_lora_lr: bool = field(
        default=False,
        metadata={
            "help": "s = λ1·lora_alpha instead of lora_alpha, so that LoRA's tuned learning rate suits QA-BLoRA."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.tile = check_tile(self.tile)
        except ValueError as err:
            raise ValueError(f"QABLoRAConfig.{err}") from None
        check_flag("QABLoRAConfig.use_lora_lr", self.use_lora_lr)
        if self.lora_alpha >= LORA_LIKE_ALPHA:
            warnings.warn(
                f"QABLoRAConfig.lora_alpha={self.lora_alpha!r} is the scale s of the update itself (ΔW = s·H/λ1), "
                f"not LoRA's alpha divided by r: this adapter's update is {self.lora_alpha:g}x that of the default "
                "lora_alpha=1.0. If the value was carried over from a LoRA config, use lora_alpha=1.0.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def scaling(self) -> float:
        """``s``: ``lora_alpha``, times λ1 with ``use_lora_lr``."""
        return float(self.lora_alpha) * (self.tile[0] if self.use_lora_lr else 1)
