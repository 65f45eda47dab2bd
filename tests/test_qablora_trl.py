"""TRL's SFTTrainer builds and trains QA-BLoRA from ``peft_config=`` on a tile-INT4 model, which merges to 4 bits."""

from __future__ import annotations

import torch
from sft import mean, sft_train
from tiny import tiny_llama, tiny_tokenizer

from peft_balanced import QABLoRAConfig
from peft_balanced.quant import TileInt4Linear, quantize_model
from peft_balanced.tuners.qablora import QABLoRALinear


def test_sft_trainer_trains_qablora_on_tile_int4_model_and_merge_stays_4bit(tmp_path):
    model = quantize_model(tiny_llama(initializer_range=0.1), tile=(4, 8))
    config = QABLoRAConfig(tile=(4, 8), lora_alpha=1.0, target_modules="all-linear")
    trainer, losses = sft_train(model, config, tmp_path / "out")
    assert any(isinstance(m, QABLoRALinear) for m in trainer.model.modules())
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5]), losses

    # Drop accelerate's bf16 autocast wrapper of forward, so that both sides below compute in float32.
    peft_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    input_ids = torch.tensor([tiny_tokenizer()("3 plus 1 is 4.")["input_ids"]])
    with torch.no_grad():
        adapted = peft_model(input_ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids).logits
    assert isinstance(merged_model.model.layers[0].self_attn.q_proj, TileInt4Linear)
    # fp16 zero points (the default scale dtype): rounding the merged β costs ~1e-3 (1.5e-3 measured); fp32 is exact.
    assert float((merged - adapted).norm() / adapted.norm()) < 3e-3
