"""Configuration of QA-BLoRA, the quantization-aware balanced adapter whose merge keeps the model 4-bit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...checkpoint import CheckedCheckpointMixin
from ...quant.tile_int4 import check_tile
from ...registry import extend_peft_type


@dataclass
class QABLoRAConfig(CheckedCheckpointMixin, PeftConfig):
    """Configuration of a :class:`QABLoRAModel`.

    Every targeted layer must be a :class:`~peft_balanced.quant.TileInt4Linear` quantized with the same ``tile``
    (quantize first with ``peft_balanced.quant.quantize_model(model, tile=...)`` or load with
    ``quantization_config=TileInt4Config(tile=...)``). Each gets one matrix ``H: (D_out/λ2, D_in/λ1)``:
    ``y = W~ x + s · expand_λ2(H pool_λ1(dropout(x)))``, i.e. ``ΔW[j, i] = s · H[j//λ2, i//λ1] / λ1``, a constant on
    every quantization tile. Merging therefore only shifts each tile's zero point, ``β ← β + s·H/λ1``, and the merged
    model is still 4-bit.

    Scaling: ``s = lora_alpha``. There is no rank (``H`` is a full matrix on the tile grid), so LoRA's
    ``lora_alpha / r`` has no reference to divide by; ``lora_alpha=1`` gives ``ΔW = H / λ1`` per weight.

    Args:
        tile: ``(λ1, λ2)``: λ1 input features x λ2 output features per tile; must equal the base's tile.
        lora_alpha: The scaling ``s``.
        lora_dropout: Dropout probability applied to the adapter input (training only).
        target_modules: Module names (list: exact or suffix match; str: regex) or ``"all-linear"`` (every
            ``TileInt4Linear`` except the output layer; linears kept in full precision are left alone).
        exclude_modules: Module names (same syntax) never to adapt.
        layers_to_transform / layers_pattern: Restrict adaptation to some layer indices.
        bias: ``"none"`` or ``"all"`` (train every bias parameter of the model).
        modules_to_save: Extra modules trained fully and stored in the checkpoint.
        trainable_token_indices: Token indices whose embeddings are trained (peft's TrainableTokens).
        init_weights: ``True``: ``H = 0`` (model unchanged at initialization); ``False``: random ``H`` (for tests).
    """

    tile: tuple[int, int] = field(
        default=(4, 8), metadata={"help": "(λ1, λ2): input x output features per tile; must match the 4-bit base."}
    )
    lora_alpha: float = field(default=1.0, metadata={"help": "Scaling s of the adapter output (s = lora_alpha)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex to adapt, or 'all-linear' (every TileInt4Linear but the head)."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt (needs a standard layer pattern)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h'."}
    )
    bias: Literal["none", "all"] = field(default="none", metadata={"help": "'none' or 'all'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token indices whose embeddings are trained (peft TrainableTokens)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: H = 0 (no change at init). False: random H (for tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type("QABLORA")
        try:
            self.tile = check_tile(self.tile)
        except ValueError as err:
            raise ValueError(f"QABLoRAConfig.{err}") from None
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"QABLoRAConfig.lora_alpha must be a number, got {self.lora_alpha!r}.")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise ValueError(f"QABLoRAConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"QABLoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all"):
            raise ValueError(f"QABLoRAConfig.bias must be 'none' or 'all', got {self.bias!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("QABLoRAConfig.layers_pattern is only used together with layers_to_transform.")
