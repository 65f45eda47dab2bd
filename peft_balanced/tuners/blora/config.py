"""Configuration of the balanced low-rank adapter (BLoRA; Q-BLoRA on a 4-bit base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...validation import check_flag, check_positive_int
from ..base_config import AdapterConfig

# The largest λ at which use_lora_lr was measured to transfer LoRA's learning rate (docs/accuracy.md).
MAX_LORA_LR_BALANCE = 2


def lora_lr_refusal(balance_factor: int) -> str | None:
    """Why ``use_lora_lr`` is refused at ``balance_factor``, or ``None`` where it was measured to work."""
    if balance_factor <= MAX_LORA_LR_BALANCE:
        return None
    return (
        f"use_lora_lr needs balance_factor <= {MAX_LORA_LR_BALANCE}, got {balance_factor}: at λ = 4 and 8 the s·λ rule "
        "made LoRA's lr 4 to 9 points worse than the paper's scaling at its own optimum (docs/accuracy.md). Leave "
        "use_lora_lr off and train at about 3x LoRA's learning rate."
    )


@dataclass
class BLoRAConfig(AdapterConfig):
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
        use_lora_lr: Multiply ``s`` by λ, which undoes the average pool's ``1/λ`` (``∂L/∂B = (α/r)·T_λ(G)·Aᵀ``, LoRA's
            form on the tile-summed gradient), so that a learning rate tuned for LoRA also suits BLoRA. Measured to
            transfer at λ = 2 only (docs/accuracy.md); at λ = 4 and 8 it overshot, so larger λ are refused: train
            those at about 3x LoRA's lr instead. ``False`` keeps the paper's ``s = lora_alpha / r``.
    """

    PEFT_TYPE_NAME: ClassVar[str] = "BLORA"

    r: int = field(default=8, metadata={"help": "Base rank; the inner rank is balance_factor * r."})
    balance_factor: int = field(default=2, metadata={"help": "λ: pool inputs / repeat outputs by this factor."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: B = 0 (no change at init). False: random B (for tests)."}
    )
    skip_indivisible: bool = field(
        default=False,
        metadata={"help": "Skip target layers whose dims are not multiples of balance_factor instead of raising."},
    )
    use_lora_lr: bool = field(
        default=False,
        metadata={
            "help": "s = λ·lora_alpha/r instead of lora_alpha/r, so that LoRA's tuned learning rate suits BLoRA."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("BLoRAConfig.r", self.r)
        check_positive_int("BLoRAConfig.balance_factor", self.balance_factor)
        check_flag("BLoRAConfig.skip_indivisible", self.skip_indivisible)
        check_flag("BLoRAConfig.use_lora_lr", self.use_lora_lr)
        if self.use_lora_lr and (refusal := lora_lr_refusal(self.balance_factor)):
            raise ValueError(f"BLoRAConfig.{refusal}")

    @property
    def scaling(self) -> float:
        """``s``: ``lora_alpha / r``, times λ with ``use_lora_lr``."""
        return self.lora_alpha / self.r * (self.balance_factor if self.use_lora_lr else 1)

    def expected_rank_dims(self) -> dict[str, tuple[int, int]]:
        inner = self.balance_factor * self.r
        return {".bal_A.": (0, inner), ".bal_B.": (1, inner)}
