"""Configuration of the balanced low-rank adapter (BLoRA; Q-BLoRA on a 4-bit base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ...checkpoint import CheckedCheckpointMixin
from ...ops import check_factor
from ...registry import extend_peft_type


@dataclass
class BLoRAConfig(CheckedCheckpointMixin, PeftConfig):
    """Configuration of a :class:`BLoRAModel`.

    BLoRA average-pools the adapter input by ``balance_factor`` (λ), runs a rank ``λ·r`` adapter on the pooled
    features and repeats its output λ times: ``y = W x + s · expand_λ(B A pool_λ(dropout(x)))`` with
    ``A: (λr, D_in/λ)``, ``B: (D_out/λ, λr)`` and ``s = lora_alpha / r``. It trains exactly as many parameters as
    LoRA at rank ``r``; ``balance_factor=1`` is LoRA. On a bitsandbytes 4-bit base it is Q-BLoRA.

    Args:
        r: Base rank; the adapter's inner rank is ``balance_factor * r``.
        balance_factor: λ, the pooling / expansion factor. Every targeted layer's in- and out-features must be
            multiples of it (see ``skip_indivisible``).
        lora_alpha: Scaling numerator, ``s = lora_alpha / r``.
        lora_dropout: Dropout probability applied to the adapter input.
        target_modules: Module names (list: exact or suffix match; str: regex) or ``"all-linear"``.
        exclude_modules: Module names (same syntax) never to adapt.
        layers_to_transform / layers_pattern: Restrict adaptation to some layer indices.
        bias: ``"none"`` or ``"all"`` (train every bias of the model).
        modules_to_save: Extra modules trained fully and stored in the checkpoint.
        trainable_token_indices: Token indices whose embeddings are trained (peft's TrainableTokens).
        init_weights: ``True``: ``B = 0`` so the model is unchanged at initialization; ``False``: random ``B``
            (for tests).
        skip_indivisible: Leave layers whose dimensions are not multiples of ``balance_factor`` un-adapted
            instead of raising an error.
    """

    r: int = field(default=8, metadata={"help": "Base rank; the inner rank is balance_factor * r."})
    balance_factor: int = field(default=2, metadata={"help": "λ: pool inputs / repeat outputs by this factor."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex to adapt, or 'all-linear'."},
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
        default=True, metadata={"help": "True: B = 0 (no change at init). False: random B (for tests)."}
    )
    skip_indivisible: bool = field(
        default=False,
        metadata={"help": "Skip target layers whose dims are not multiples of balance_factor instead of raising."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type("BLORA")
        check_factor("BLoRAConfig.r", self.r)
        check_factor("BLoRAConfig.balance_factor", self.balance_factor)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise ValueError(f"BLoRAConfig.lora_alpha must be a number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"BLoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all"):
            raise ValueError(f"BLoRAConfig.bias must be 'none' or 'all', got {self.bias!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("BLoRAConfig.layers_pattern is only used together with layers_to_transform.")
