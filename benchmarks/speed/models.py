"""The models that ``speed.py`` measures: a random-weight Llama in bf16, NF4 or INT4, and each method's adapter config.

``METHODS`` are the training methods (the ``--methods`` choices), ``BASE_OF`` the base format of each one.
"""

from __future__ import annotations

import torch
from peft import LoraConfig

import peft_balanced
from peft_balanced.demo.models import LLAMA_PROJECTIONS, quantize_linear_nf4

METHODS = ("lora", "qlora", "blora", "qblora", "qblora_bnb", "qablora", "qlora_match", "gradapprox")
BASE_OF = {  # method -> base format
    "lora": "bf16", "blora": "bf16", "gradapprox": "bf16",
    "qlora": "nf4", "qblora": "nf4", "qblora_bnb": "nf4", "qlora_match": "nf4",
    "qablora": "int4",
}  # fmt: skip


def build_model(args, base: str):
    """A random-weight Llama in bf16 on the device, with its projections in ``base`` format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.seq + args.decode_tokens),
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if base == "nf4":
        quantize_linear_nf4(model, compute_dtype=torch.bfloat16, double_quant=True)
    elif base == "int4":
        peft_balanced.quantize_model(model, tile=tuple(args.tile))
    model.config.use_cache = False
    return model


def adapter_config(method: str, args, qablora_params: int | None = None):
    common = dict(target_modules=list(LLAMA_PROJECTIONS), lora_dropout=0.0)
    if method in ("lora", "qlora"):
        return LoraConfig(r=args.r, lora_alpha=2 * args.r, **common)
    if method == "qlora_match":
        per_rank = qablora_params // args.r_match_denominator
        return LoraConfig(r=max(1, round(per_rank)), lora_alpha=2 * args.r, **common)
    if method in ("blora", "qblora", "qblora_bnb"):
        return peft_balanced.BLoRAConfig(r=args.r, balance_factor=args.balance, lora_alpha=2 * args.r, **common)
    if method == "qablora":
        return peft_balanced.QABLoRAConfig(tile=tuple(args.tile), lora_alpha=2.0, **common)
    if method == "gradapprox":
        return peft_balanced.GradApproxConfig(r=args.r, lora_alpha=2 * args.r, init="lora", **common)
    raise ValueError(f"unknown method {method!r}; valid: {METHODS}")


def qablora_param_count(args) -> int:
    l1, l2 = args.tile
    attn = 4 * args.hidden * args.hidden
    mlp = 3 * args.hidden * args.inter
    return args.layers * (attn + mlp) // (l1 * l2)


def random_batch(args, generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
    return {"input_ids": ids, "labels": ids}
