"""Supervised fine-tuning with BLoRA / Q-BLoRA, QA-BLoRA or GradApprox, in the shape of TRL's ``trl/scripts/sft.py``.

Copy it and edit it: it is TRL's recipe (``TrlParser`` over ``ScriptArguments``, ``SFTConfig``, ``ModelConfig``) plus
peft-balanced's ``BalancedArguments`` (``--peft_method``, ``--balance_factor``, ``--tile``, ``--approximator_depth``,
``--merge``). ``peft-balanced sft`` runs the same steps.

    # Q-BLoRA: BLoRA on an NF4 base, then a lossless merge into a 16-bit model
    python examples/sft.py --model_name_or_path MODEL --dataset_name train.jsonl --output_dir out \\
        --peft_method blora --balance_factor 2 --lora_r 16 --load_in_4bit --dtype bfloat16 --merge

    # QA-BLoRA: tile-INT4 base, merged into a model that is still 4-bit
    accelerate launch --num_processes 2 examples/sft.py --model_name_or_path MODEL --dataset_name trl-lib/Capybara \\
        --output_dir out --peft_method qablora --load_in_4bit --tile 4,8 --merge
"""

import peft_balanced  # noqa: F401  (registers the BLORA / QABLORA / GRADAPPROX PEFT types; import it first)
from peft_balanced.cli.sft import SFTArgumentError, build_trainer, given_flags, make_parser, prepare, save_merged


def main(script_args, training_args, model_args, balanced_args, given):
    # 1. Every check that needs no weights: flag combinations, data files, output dirs, the model's config.json.
    plan = prepare(script_args, training_args, model_args, balanced_args, given)

    # 2. TRL's SFTTrainer loads the model (NF4 / tile INT4 with --load_in_4bit) and wraps it with our peft config.
    trainer = build_trainer(script_args, training_args, model_args, balanced_args, plan)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # the adapter: PeftModel.from_pretrained(base, output_dir)

    # 3. Optionally merge: dense for blora / gradapprox, still 4-bit for qablora. One process writes it.
    if plan.merged_dir is not None:
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            save_merged(
                model, balanced_args.peft_method, plan.merged_dir, balanced_args.merged_dtype, trainer.processing_class
            )
        trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()


if __name__ == "__main__":
    import sys

    parser = make_parser()
    args = parser.parse_args_and_config()
    try:
        main(*args, given=given_flags(sys.argv[1:]))
    except SFTArgumentError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
