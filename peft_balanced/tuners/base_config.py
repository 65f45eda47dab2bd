"""The configuration fields every peft-balanced tuner shares (those peft and TRL read), validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft.config import PeftConfig

from ..checkpoint import CheckedCheckpointMixin
from ..integration import extend_peft_type
from ..validation import check_flag, check_module_names, check_number, check_positive_number


@dataclass
class AdapterConfig(CheckedCheckpointMixin, PeftConfig):
    """Shared fields: scaling, dropout, which modules to adapt, biases, extra trainable modules, initialization.

    Subclasses set ``PEFT_TYPE_NAME`` and add their own fields; ``__post_init__`` sets ``peft_type`` and checks the
    shared fields, naming the config class and the field in every error.
    """

    PEFT_TYPE_NAME: ClassVar[str] = ""

    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator of the adapter output."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to adapt, or 'all-linear'."}
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
        default=True, metadata={"help": "True: the model is unchanged at initialization. False: random (tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type(self.PEFT_TYPE_NAME)
        owner = type(self).__name__
        check_positive_number(f"{owner}.lora_alpha", self.lora_alpha)
        check_number(f"{owner}.lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{owner}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all"):
            raise ValueError(f"{owner}.bias must be 'none' or 'all', got {self.bias!r}.")
        check_flag(f"{owner}.init_weights", self.init_weights)
        for name in ("target_modules", "exclude_modules"):
            check_module_names(f"{owner}.{name}", getattr(self, name))
        layers = self.layers_to_transform
        for index in [layers] if isinstance(layers, int) else list(layers or ()):
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(
                    f"{owner}.layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}."
                )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}.layers_pattern is only used together with layers_to_transform.")
