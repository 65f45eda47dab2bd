"""The rows of the accuracy benchmark: each method's base format, adapter and finish, and the training recipes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peft_balanced.tuners.blora.config import lora_lr_factor


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a base format, an adapter and what happens after training.

    ``finish``: ``"none"`` (evaluate the adapter), ``"merge_int4"`` (QA-BLoRA merged into its 4-bit base) or
    ``"requant_nf4"`` (merged into a 16-bit model, re-quantized to NF4). Methods with the same ``trains_as`` share
    one training run per seed when they run in the same call.
    """

    name: str
    base: str  # "dense", "nf4" or "int4"
    adapter: str  # "none", "lora", "lora_ga", "blora", "qablora" or "gradapprox"
    about: str
    balance: int = 1
    tile: tuple[int, int] = (4, 8)
    finish: str = "none"
    depth: int = 0
    trains_as: str = ""
    use_lora_lr: bool = False  # the configs' use_lora_lr: s times min(λ, 2) (BLoRA) or λ1 (QA-BLoRA)
    alpha_factor: float = 1.0  # a candidate rule under study: lora_alpha (so s) times this
    # A method trained under a scaling rule is named after the method it rescales plus a suffix
    # (report.py scaling_rule).

    @property
    def training_key(self) -> str:
        return self.trains_as or self.name


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("base", "dense", "none", "base model, zero-shot"),
        Method("lora", "dense", "lora", "peft LoRA on the 16-bit base"),
        Method("qlora", "nf4", "lora", "peft LoRA on NF4 (double quant)"),
        Method("blora2", "dense", "blora", "BLoRA, balance 2, on the 16-bit base", balance=2),
        *(Method(f"qblora{b}", "nf4", "blora", f"Q-BLoRA, balance {b}, on NF4", balance=b) for b in (1, 2, 4, 8)),
        *(
            Method(
                f"qablora{a}x{b}", "int4", "qablora", f"QA-BLoRA {a}x{b} merged into INT4", (1), (a, b), "merge_int4"
            )
            for a, b in ((4, 8), (8, 8))
        ),
        *(
            Method(
                f"qblora{b}_loralr",
                "nf4",
                "blora",
                f"Q-BLoRA, balance {b}, s × {lora_lr_factor(b)} (use_lora_lr)",
                balance=b,
                use_lora_lr=True,
            )
            for b in (2, 4, 8)
        ),
        *(  # use_lora_lr's first rule, s × λ, which overshot above λ = 2 (docs/accuracy.md)
            Method(
                f"qblora{b}_s{b}", "nf4", "blora", f"Q-BLoRA, balance {b}, s × {b}", balance=b, alpha_factor=float(b)
            )
            for b in (4, 8)
        ),
        *(
            Method(
                f"qablora{a}x{b}_loralr",
                "int4",
                "qablora",
                f"QA-BLoRA {a}x{b} merged into INT4, s × {a} (use_lora_lr)",
                (1),
                (a, b),
                "merge_int4",
                use_lora_lr=True,
            )
            for a, b in ((4, 8), (8, 8))
        ),
        Method(
            "lora_ptq_int4",
            "dense",
            "lora",
            "LoRA merged into the 16-bit base, then RTN to 4x8-tile INT4 (QA-BLoRA's format and bits)",
            finish="ptq_int4",
            trains_as="lora",
        ),
        Method(
            "qlora_ptq_int4",
            "nf4",
            "lora",
            "QLoRA's update merged into the ORIGINAL 16-bit weights, then RTN to 4x8-tile INT4",
            finish="ptq_int4",
            trains_as="qlora",
        ),
        Method(
            "qlora_ptq_nf4",
            "nf4",
            "lora",
            "QLoRA's update merged into the ORIGINAL 16-bit weights, then NF4 (double quant)",
            finish="ptq_nf4",
            trains_as="qlora",
        ),
        Method(
            "qlora_requant",
            "nf4",
            "lora",
            "strawman: QLoRA merged into the NF4-DEQUANTIZED weights, re-quantized to NF4 (rounds small updates away)",
            finish="requant_nf4",
            trains_as="qlora",
        ),
        Method("lora_ga", "dense", "lora_ga", "peft LoRA-GA init (preprocess_loraga) on the 16-bit base"),
        Method("gradapprox", "dense", "gradapprox", "GradApprox init (LoRA-GA style) on the 16-bit base"),
        *(
            Method(f"gradapprox_d{d}", "dense", "gradapprox", f"GradApprox init + approximator depth {d}", depth=d)
            for d in (1, 3, 5)
        ),
    )
}
# The paper's fine-tuning recipe (QLoRA's): r = 64, lora_alpha = 16, constant learning rate (2e-4 in the paper),
# gradient-norm clipping 0.3. "default" is this benchmark's own: --r, --lora-alpha, linear decay, clipping 1.0.
RECIPES: dict[str, dict] = {
    "default": {},
    "paper": {"r": 64, "lora_alpha": 16.0, "schedule": "constant", "grad_clip": 0.3},
}


class Diverged(RuntimeError):
    """Training produced a non-finite loss (this learning rate is too large for the method)."""


def resolve_methods(names: Sequence[str]) -> list[Method]:
    """The :class:`Method` of every name, in order, without duplicates; unknown names raise."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; valid methods: {', '.join(METHODS)}")
    return [METHODS[n] for n in dict.fromkeys(names)]
