"""Configuration of GradApprox: LoRA-shaped adapters initialised from a streamed sketch of the full gradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...validation import check_count, check_positive_int, check_positive_number
from ..base_config import AdapterConfig

INIT_MODES = ("gradient", "lora")
DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
INIT_SCALES = ("stable", "gd", "unit")


@dataclass
class GradApproxConfig(AdapterConfig):
    """Configuration of a :class:`GradApproxModel`.

    Every targeted linear layer gets ``A: (r, D_in)``, ``B: (D_out, r)`` and frozen persistent copies ``A0``, ``B0``
    of their initial values: ``y = base(x) + s · (B A − B0 A0) dropout(x)`` with ``s = lora_alpha / r``. The model is
    therefore unchanged at initialization whatever ``A0`` and ``B0`` are, without touching the (possibly 4-bit) base
    weights, and an adapter checkpoint is self-contained.

    With ``init="gradient"``, :func:`peft_balanced.init_gradapprox` (or :class:`GradApproxInitCallback` inside a
    ``Trainer``) streams ``estimation_batches`` batches, sketches each module's full-weight gradient
    ``G: (D_out, D_in)`` and sets ``A``, ``B`` from its top ``2r`` singular vectors as LoRA-GA does, so that the first
    update of ``s·B A`` follows the rank-``2r`` part of full fine-tuning's first update.

    Args:
        r: Adapter rank. Gradient initialization needs ``2 * r <= min(D_in, D_out)`` for every targeted layer.
        lora_alpha: Scaling numerator, ``s = lora_alpha / r``.
        lora_dropout: Dropout probability applied to the adapter input.
        target_modules: Module names (list: exact or suffix match; str: regex) or ``"all-linear"``.
        exclude_modules: Module names (same syntax) never to adapt.
        layers_to_transform / layers_pattern: Restrict adaptation to some layer indices.
        bias: ``"none"`` or ``"all"`` (train every bias of the model).
        modules_to_save: Extra modules trained fully and stored in the checkpoint.
        trainable_token_indices: Token indices whose embeddings are trained (peft's TrainableTokens).
        init: ``"gradient"`` (LoRA-GA from the sketched gradient; until it runs the adapter is LoRA-initialised
            and a training forward raises an error, eval / no-grad forwards are allowed) or ``"lora"``
            (Kaiming-uniform ``A``, zero ``B``).
        init_weights: ``True``: zero ``B`` at creation (LoRA); ``False``: random ``B`` (for tests).
        estimation_batches: Default number of batches the gradient sketch streams over.
        oversampling: Extra sketch columns: the range sketch has ``k = 2r + oversampling`` columns and the co-range
            sketch ``2k + 1`` rows (both capped by the layer's dimensions; at the cap the result is exact).
        sketch_passes: Passes over the (cached) estimation batches. Each pass after the first re-sketches ``G``
            against the subspaces found by the previous one (a power-iteration step), which sharpens the subspace
            when ``G``'s spectrum decays slowly; cost: one forward+backward per batch and pass.
        direction: Which singular vectors go where (LoRA-GA's names): ``"ArB2r"`` (A: 1..r, B: r+1..2r),
            ``"A2rBr"`` (A: r+1..2r, B: 1..r), ``"ArBr"`` (interleaved).
        init_scale: ``"stable"``: ``A`` and ``B`` times ``D_out^(1/4) / sqrt(stable_gamma)``; ``"gd"``: divided by
            ``s`` (the first step then equals full fine-tuning's rank-2r step under SGD); ``"unit"``: orthonormal.
        stable_gamma: γ of the ``"stable"`` scale.
        sketch_seed: Seed of the random test matrices (identical on every process, so DDP ranks agree).
        approximator_depth: Residual blocks of the learned gradient approximator (experimental, see
            :class:`~peft_balanced.experimental.GradientApproximation`): ``0`` = off (default), ``1..5`` = on. It
            is used by :class:`~peft_balanced.experimental.GradApproxTrainer` (or a plain loop through
            ``GradientApproximation``); it does not change the adapter or its checkpoint.
        approximator_width: Hidden width of the approximator.
        refresh_every: K: after the warm-up, every K-th optimizer step runs full backprop (and trains the
            approximator); the others use predicted gradients and skip the backward pass.
        approximator_warmup_steps: Optimizer steps at the start that all run full backprop.
        approximator_lr: AdamW learning rate of the approximator.
        approximator_tokens: Tokens per batch (sampled) whose true output gradients train the approximator.
        approximator_clip: Each token's predicted gradient norm is capped at ``clip · sqrt(D_out)`` in units of the
            module's running gradient RMS.
    """

    PEFT_TYPE_NAME: ClassVar[str] = "GRADAPPROX"

    r: int = field(default=8, metadata={"help": "Adapter rank."})
    init: Literal["gradient", "lora"] = field(
        default="gradient", metadata={"help": "'gradient' (LoRA-GA from the sketched gradient) or 'lora'."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: B = 0 at creation. False: random B (for tests)."}
    )
    estimation_batches: int = field(default=8, metadata={"help": "Batches streamed by the gradient sketch."})
    oversampling: int = field(default=16, metadata={"help": "Sketch columns beyond 2r."})
    sketch_passes: int = field(
        default=2, metadata={"help": "Passes over the estimation batches (each one is a power-iteration step)."}
    )
    direction: Literal["ArB2r", "A2rBr", "ArBr"] = field(
        default="ArB2r", metadata={"help": "Which singular vectors initialise A and B (LoRA-GA)."}
    )
    init_scale: Literal["stable", "gd", "unit"] = field(
        default="stable", metadata={"help": "Scale of the initial A and B (LoRA-GA)."}
    )
    stable_gamma: float = field(default=16.0, metadata={"help": "γ of the 'stable' scale."})
    sketch_seed: int = field(default=0, metadata={"help": "Seed of the sketch's random test matrices."})
    approximator_depth: int = field(
        default=0, metadata={"help": "Residual blocks of the gradient approximator, 1..5; 0 = off (default)."}
    )
    approximator_width: int = field(default=64, metadata={"help": "Hidden width of the gradient approximator."})
    refresh_every: int = field(
        default=4, metadata={"help": "Every K-th step runs full backprop; the others use predicted gradients."}
    )
    approximator_warmup_steps: int = field(default=4, metadata={"help": "Initial steps that all run full backprop."})
    approximator_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the approximator."})
    approximator_tokens: int = field(
        default=256, metadata={"help": "Sampled tokens per exact batch that train the approximator."}
    )
    approximator_clip: float = field(
        default=3.0, metadata={"help": "Cap on a token's predicted gradient norm, in units of sqrt(D_out)·RMS."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("GradApproxConfig.r", self.r)
        check_positive_int("GradApproxConfig.estimation_batches", self.estimation_batches)
        check_positive_int("GradApproxConfig.sketch_passes", self.sketch_passes)
        check_count("GradApproxConfig.oversampling", self.oversampling)
        check_count("GradApproxConfig.sketch_seed", self.sketch_seed)
        check_positive_number("GradApproxConfig.stable_gamma", self.stable_gamma)
        for name, valid in (("init", INIT_MODES), ("direction", DIRECTIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"GradApproxConfig.{name} must be one of {valid}, got {getattr(self, name)!r}.")
        if self.init_scale not in INIT_SCALES:
            raise ValueError(f"GradApproxConfig.init_scale must be one of {INIT_SCALES}, got {self.init_scale!r}.")
        depth = self.approximator_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 5:
            raise ValueError(
                f"GradApproxConfig.approximator_depth must be an integer in 0..5 (0 = approximator off), got {depth!r}."
            )
        for name in ("approximator_width", "refresh_every", "approximator_tokens"):
            check_positive_int(f"GradApproxConfig.{name}", getattr(self, name))
        check_count("GradApproxConfig.approximator_warmup_steps", self.approximator_warmup_steps)
        for name in ("approximator_lr", "approximator_clip"):
            check_positive_number(f"GradApproxConfig.{name}", getattr(self, name))

    def expected_rank_dims(self) -> dict[str, tuple[int, int]]:
        return {".gax_A.": (0, self.r), ".gax_A0": (0, self.r), ".gax_B.": (1, self.r), ".gax_B0": (1, self.r)}
