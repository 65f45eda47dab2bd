"""``peft-balanced sft``: TRL-style supervised fine-tuning with BLoRA / Q-BLoRA, QA-BLoRA or GradApprox.

The command line is TRL's own (``TrlParser`` over ``ScriptArguments``, ``SFTConfig`` and ``ModelConfig``, so every
``trl sft`` flag and ``--config file.yaml`` work) plus :class:`BalancedArguments`. ModelConfig's ``--lora_r``,
``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``, ``--lora_modules_to_save`` and ``--load_in_4bit``
configure the adapter: ``--load_in_4bit`` is bitsandbytes NF4 for BLoRA (Q-BLoRA) and GradApprox, and the 2-D-tile
INT4 format (:class:`~peft_balanced.TileInt4Config`) for QA-BLoRA. Wrong combinations fail before any model loads.

    peft-balanced sft --model_name_or_path MODEL --dataset_name data.jsonl --peft_method blora --output_dir out
    peft-balanced sft --model_name_or_path default ...     # the embedded offline model (or a path to a .gguf file)
    accelerate launch --num_processes 2 -m peft_balanced.cli.sft --model_name_or_path MODEL ...
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_quantization_config
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("peft-balanced sft needs TRL and datasets: pip install 'peft-balanced[trl]'") from err

from .._compat import quiet_peft_checkpointing_alias
from .model_source import resolve_model
from .sft_checks import (
    DEFAULT_BALANCE_FACTOR,
    METHODS,
    REMOTE_CODE_FLAG,
    SFTArgumentError,
    check_flags,
    check_model_shapes,
    check_no_remote_code,
    local_data_files,
)

__all__ = [
    "BalancedArguments",
    "BalancedSFTConfig",
    "SFTArgumentError",
    "SFTPlan",
    "build_peft_config",
    "build_trainer",
    "load_sft_dataset",
    "main",
    "make_parser",
    "prepare",
    "save_merged",
]


@dataclass
class BalancedArguments:
    """peft-balanced's flags, next to TRL's (``--lora_r`` / ``--lora_alpha`` / ... come from ``ModelConfig``)."""

    peft_method: str = field(
        default="blora",
        metadata={
            "help": "Adapter: 'blora' (BLoRA; Q-BLoRA with --load_in_4bit, NF4), 'qablora' (QA-BLoRA on a tile-INT4 "
            "base: needs --load_in_4bit or a tile-INT4 checkpoint) or 'gradapprox' (gradient-subspace init).",
            "choices": list(METHODS),
        },
    )
    balance_factor: int | None = field(
        default=None,
        metadata={
            "help": "BLoRA only: λ, the pooling / repeat factor (default 2; the paper uses 2 for LLaMA-family models, "
            "8 for Mistral/Gemma; 1 is LoRA). Must divide D_in and D_out of every targeted projection."
        },
    )
    tile: str | None = field(
        default=None,
        metadata={
            "help": "QA-BLoRA only: 'λ1,λ2' input x output features per INT4 tile (default 4,8, or the tile of a "
            "tile-INT4 checkpoint). λ1 must divide every projection's D_in, λ2 its D_out."
        },
    )
    use_lora_lr: bool = field(
        default=False,
        metadata={
            "help": "blora / qablora: scale the adapter so that the learning rate you would give LoRA fits: s times "
            "min(λ, 2) for BLoRA, times λ1 for QA-BLoRA (measured: docs/accuracy.md). Without it, balanced adapters "
            "want about 3x LoRA's learning rate."
        },
    )
    approximator_depth: int | None = field(
        default=None,
        metadata={
            "help": "GradApprox only: residual blocks (1..5) of the experimental learned gradient approximator, which "
            "skips the backbone's backward pass on most steps; 0 or unset: off (docs/benchmarks.md: not shown to pay off)."
        },
    )
    gradapprox_init_batches: int | None = field(
        default=None,
        metadata={"help": "GradApprox only: training batches streamed by the gradient-subspace init (default 8)."},
    )
    merge: bool = field(
        default=False,
        metadata={
            "help": "After training, also save a merged model: dense (dequantized, lossless) for blora/gradapprox; "
            "still 4-bit for qablora (the adapter goes into the INT4 zero points). Plain from_pretrained reloads it."
        },
    )
    merged_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where --merge saves the merged model (default: <output_dir>/merged); must be new or empty."
        },
    )
    merged_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the merged model for blora/gradapprox ('auto': the dtype the weights were loaded in, "
            "--dtype; use bfloat16 or float16 for a 16-bit model).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )


@dataclass
class BalancedSFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` with its checkpointing default (on) expressed through transformers' current name.

    TRL 1.16 defaults the deprecated ``gradient_checkpointing`` alias to ``True``, which makes transformers >= 5.23
    warn on every run; here the default lands on ``activation_checkpointing`` instead, and an explicit
    ``--gradient_checkpointing`` still works (and still gets transformers' notice).
    """

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of --activation_checkpointing, which is on by default (TRL's default)."},
    )

    def __post_init__(self) -> None:
        if self.gradient_checkpointing is None:
            if not hasattr(self, "activation_checkpointing"):  # transformers before the rename
                self.gradient_checkpointing = True
            elif self.activation_checkpointing is None:
                self.activation_checkpointing = True
        super().__post_init__()


@dataclass
class SFTPlan:
    """What :func:`prepare` settled before any model is loaded."""

    target_modules: str | list[str]
    tile: tuple[int, int] | None
    merged_dir: Path | None
    given: set[str]


# ModelConfig's help strings speak of LoRA only; these say what the flags do here.
MODEL_FLAG_HELP = {
    "use_peft": "Ignored: peft-balanced sft always trains a PEFT adapter (--peft_method).",
    "lora_r": "Base rank r of blora / gradapprox (BLoRA's inner rank is λ·r; same trainable parameters as LoRA at "
    "rank r). Not used by qablora, which has no rank.",
    "lora_alpha": "Scaling numerator: s = lora_alpha / r for blora / gradapprox; for qablora s = lora_alpha "
    "(default there: 1, QABLoRAConfig's).",
    "lora_dropout": "Dropout probability on the adapter input.",
    "lora_target_modules": "Modules to adapt: names (q_proj v_proj ...), one regex, or all-linear (the default here: "
    "every projection but the output layer).",
    "lora_modules_to_save": "Modules trained fully and stored in the adapter checkpoint.",
    "lora_task_type": "peft task type of the adapter config.",
    "load_in_4bit": "Load the base in 4 bits: bitsandbytes NF4 for blora (= Q-BLoRA) and gradapprox; the 2-D-tile "
    "INT4 format with --tile (TileInt4Config) for qablora, which requires it unless the model is saved in tile INT4.",
    "load_in_8bit": "Load the base in bitsandbytes 8-bit (blora / gradapprox only).",
    REMOTE_CODE_FLAG: "Refused: peft-balanced sft never runs code shipped with a model.",
}


def make_parser(prog: str | None = None) -> TrlParser:
    """``TrlParser`` over ``ScriptArguments``, :class:`BalancedSFTConfig`, ``ModelConfig`` and :class:`BalancedArguments`."""
    parser = TrlParser((ScriptArguments, BalancedSFTConfig, ModelConfig, BalancedArguments), prog=prog)
    for action in parser._actions:
        if action.dest in MODEL_FLAG_HELP:
            action.help = MODEL_FLAG_HELP[action.dest] + " (default: %(default)s)"
    return parser


def given_flags(argv: Sequence[str]) -> set[str]:
    """Names (underscored) of the flags in ``argv`` and of the keys of a ``--config`` YAML file."""
    names = {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}
    argv = list(argv)
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as handle:
            config = yaml.safe_load(handle) or {}
        names |= {str(key) for key in config if key != "env"}
    return names


def _targets(lora_target_modules: str | list[str] | None) -> str | list[str]:
    """``None`` -> ``"all-linear"``; one plain module name (which TRL leaves as a string, i.e. a regex) -> ``[name]``."""
    if lora_target_modules is None:
        return "all-linear"
    if isinstance(lora_target_modules, str):
        if lora_target_modules != "all-linear" and lora_target_modules.replace("_", "").isalnum():
            return [lora_target_modules]
        return lora_target_modules
    return list(lora_target_modules)


def _read_model_config(model_args: ModelConfig) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
        )
    except (OSError, ValueError) as err:
        raise SFTArgumentError(
            f"cannot read the config of --model_name_or_path {model_args.model_name_or_path}: {err}"
        ) from None


def prepare(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    balanced: BalancedArguments,
    given: set[str] | None = None,
) -> SFTPlan:
    """Every check that can run before a model loads: flag combinations, data files, output dirs, model shapes."""
    given = set(given or ())
    check_flags(balanced, model_args, script_args, given)
    check_no_remote_code(training_args, model_args)
    merged_dir = None
    if balanced.merge:
        merged_dir = Path(balanced.merged_output_dir or Path(training_args.output_dir) / "merged")
        if merged_dir.exists() and (not merged_dir.is_dir() or any(merged_dir.iterdir())):
            raise SFTArgumentError(f"--merged_output_dir {merged_dir} exists and is not empty; choose a new directory")
    elif balanced.merged_output_dir is not None:
        raise SFTArgumentError("--merged_output_dir needs --merge")
    if balanced.approximator_depth and training_args.world_size > 1:
        raise SFTArgumentError(
            f"--approximator_depth runs in one process only (its predicted updates are not all-reduced); this "
            f"launch has {training_args.world_size} processes. Use --approximator_depth 0 or a single process"
        )
    local_data_files(script_args.dataset_name)
    targets = _targets(model_args.lora_target_modules)
    try:
        model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    except FileNotFoundError as err:
        raise SFTArgumentError(str(err)) from None
    config = _read_model_config(model_args)
    tile = check_model_shapes(balanced, model_args, config, targets)
    return SFTPlan(target_modules=targets, tile=tile, merged_dir=merged_dir, given=given)


def load_sft_dataset(script_args: ScriptArguments):
    """The ``DatasetDict`` of ``--dataset_name``: local .json/.jsonl/.parquet/.csv files (split ``train``), a local
    dataset directory, or a Hub id (with ``--dataset_config`` and ``--dataset_streaming``)."""
    from datasets import load_dataset

    local = local_data_files(script_args.dataset_name)
    if local is not None:
        builder, files = local
        return load_dataset(builder, data_files={"train": files}, streaming=script_args.dataset_streaming)
    return load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )


def _split(dataset, name: str, flag: str):
    if name not in dataset:
        raise SFTArgumentError(f"{flag} {name!r} is not a split of the dataset; it has {sorted(dataset)}")
    return dataset[name]


def build_peft_config(balanced: BalancedArguments, model_args: ModelConfig, plan: SFTPlan):
    """The peft config of ``--peft_method`` from ModelConfig's ``--lora_*`` flags and :class:`BalancedArguments`."""
    from .. import BLoRAConfig, GradApproxConfig, QABLoRAConfig

    common: dict[str, Any] = {
        "task_type": model_args.lora_task_type,
        "lora_dropout": model_args.lora_dropout,
        "target_modules": plan.target_modules,
        "modules_to_save": model_args.lora_modules_to_save,
    }
    if balanced.peft_method == "qablora":
        if "lora_alpha" in plan.given:  # QA-BLoRA's s is lora_alpha itself: TRL's default 32 would be far too big
            common["lora_alpha"] = model_args.lora_alpha
        return QABLoRAConfig(tile=plan.tile, use_lora_lr=balanced.use_lora_lr, **common)
    common |= {"r": model_args.lora_r, "lora_alpha": model_args.lora_alpha}
    if balanced.peft_method == "blora":
        return BLoRAConfig(
            balance_factor=balanced.balance_factor or DEFAULT_BALANCE_FACTOR,
            use_lora_lr=balanced.use_lora_lr,
            **common,
        )
    return GradApproxConfig(approximator_depth=balanced.approximator_depth or 0, **common)


def _quantization_config(balanced: BalancedArguments, model_args: ModelConfig, plan: SFTPlan):
    if balanced.peft_method == "qablora":
        from ..quant import TileInt4Config

        return TileInt4Config(tile=plan.tile) if model_args.load_in_4bit else None
    return get_quantization_config(model_args)


def build_trainer(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    balanced: BalancedArguments,
    plan: SFTPlan,
):
    """Load the data and tokenizer and build TRL's ``SFTTrainer`` (which loads the model and wraps it)."""
    from transformers import AutoTokenizer

    from .. import GradApproxInitCallback
    from ..experimental import with_gradient_approximator

    dataset = load_sft_dataset(script_args)
    train_dataset = _split(dataset, script_args.dataset_train_split, "--dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _split(dataset, script_args.dataset_test_split, "--dataset_test_split")
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = _quantization_config(balanced, model_args, plan)
    if quantization_config is not None:  # via model_init_kwargs: trl 1.0's SFTTrainer has no quantization_config=
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = model_init_kwargs | dict(training_args.model_init_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    trainer_cls, callbacks = SFTTrainer, []
    if balanced.peft_method == "gradapprox":
        callbacks.append(
            GradApproxInitCallback(
                num_batches=balanced.gradapprox_init_batches, progress=not training_args.disable_tqdm
            )
        )
        if balanced.approximator_depth:
            trainer_cls = with_gradient_approximator(SFTTrainer)
    with quiet_peft_checkpointing_alias():
        return trainer_cls(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=build_peft_config(balanced, model_args, plan),
            callbacks=callbacks,
        )


def save_merged(peft_model, method: str, merged_dir: Path, merged_dtype: str = "auto", tokenizer=None) -> Path:
    """Merge ``peft_model``'s adapter and save the result to ``merged_dir`` atomically (a sibling temp dir renamed).

    BLoRA / GradApprox: ``merge_and_unload(dequantize=True)``, a dense model (exact; cast to ``merged_dtype`` unless
    ``"auto"``). QA-BLoRA: ``merge_and_unload()``, still tile INT4 (only the zero points move).
    """
    import torch

    peft_model.eval()
    if method == "qablora":
        merged = peft_model.merge_and_unload()
    else:
        dtype = None if merged_dtype == "auto" else getattr(torch, merged_dtype)
        merged = peft_model.merge_and_unload(dequantize=True, dtype=dtype)
        if dtype is not None:
            merged = merged.to(dtype)
    merged_dir = Path(merged_dir)
    partial = merged_dir.with_name(f".{merged_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if merged_dir.is_dir() and not any(merged_dir.iterdir()):
        merged_dir.rmdir()
    os.replace(partial, merged_dir)
    return merged_dir


def run(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    balanced: BalancedArguments,
    given: set[str] | None = None,
):
    """Check, train, save the adapter to ``--output_dir`` and, with ``--merge``, the merged model; returns the trainer."""
    plan = prepare(script_args, training_args, model_args, balanced, given)
    trainer = build_trainer(script_args, training_args, model_args, balanced, plan)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"adapter saved to {training_args.output_dir}")
    if plan.merged_dir is not None:
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            save_merged(model, balanced.peft_method, plan.merged_dir, balanced.merged_dtype, trainer.processing_class)
            trainer.accelerator.print(f"merged model saved to {plan.merged_dir}")
        trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return trainer


def main(argv: Sequence[str] | None = None, prog: str = "peft-balanced sft") -> int:
    """Entry point of ``peft-balanced sft`` (and ``python -m peft_balanced.cli.sft``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog)
    script_args, training_args, model_args, balanced = parser.parse_args_and_config(argv)
    try:
        run(script_args, training_args, model_args, balanced, given_flags(argv))
    except SFTArgumentError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m peft_balanced.cli.sft"))
