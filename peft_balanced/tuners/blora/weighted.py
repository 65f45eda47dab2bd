"""``add_weighted_adapter`` for BLoRA: concatenating same-λ adapters gives ``Σ_i w_i ΔW_i`` exactly.

Adapter ``i`` holds ``A_i: (λr_i, D_in/λ)``, ``B_i: (D_out/λ, λr_i)`` and ``ΔW_i = s_i · expand_blocks(B_i A_i) / λ``.
Stacking ``A = [A_1; A_2; …]: (λΣr_i, D_in/λ)`` and ``B = [w_1 s_1 B_1, w_2 s_2 B_2, …]: (D_out/λ, λΣr_i)`` with
scaling 1 gives ``B A = Σ_i w_i s_i B_i A_i``, hence ``ΔW = Σ_i w_i ΔW_i``: a rank-``Σr_i`` BLoRA adapter with the
same λ. Averaging A and B (peft's "linear") or an SVD of the expanded sum would not keep that form exactly.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import BLoRAConfig
from .layer import BLoRALayer

COMBINATION_TYPES = ("cat",)


def check_weighted_adapters(
    tuner, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str
):
    """Validate the arguments of ``add_weighted_adapter``; return the adapters' configs."""
    if combination_type not in COMBINATION_TYPES:
        raise NotImplementedError(
            f"BLoRA does not support add_weighted_adapter(combination_type={combination_type!r}): only "
            "combination_type='cat' is implemented, which concatenates the adapters (rank r_1 + r_2 + ...) and is "
            "exact; averaging A and B or an SVD of the sum would not keep the balanced (pool / expand) form."
        )
    adapters = list(adapters)
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter.")
    if len(weights) != len(adapters):
        raise ValueError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights.")
    unknown = [name for name in adapters if name not in tuner.peft_config]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(tuner.peft_config)}.")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another adapter_name.")
    configs = [tuner.peft_config[name] for name in adapters]
    if not all(isinstance(config, BLoRAConfig) for config in configs):
        raise ValueError(
            f"add_weighted_adapter combines BLoRA adapters only; got {[type(c).__name__ for c in configs]}."
        )
    factors = {name: config.balance_factor for name, config in zip(adapters, configs, strict=True)}
    if len(set(factors.values())) > 1:
        raise ValueError(
            f"add_weighted_adapter needs adapters with one balance_factor (their updates live on different tiles); "
            f"got balance_factor {factors}."
        )
    extras = [
        name for name, c in zip(adapters, configs, strict=True) if c.modules_to_save or c.trainable_token_indices
    ]
    if extras:
        raise NotImplementedError(
            f"add_weighted_adapter cannot combine adapters with modules_to_save or trainable_token_indices: {extras}."
        )
    return configs


def add_weighted_blora_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Add ``adapter_name`` with update ``Σ_i weights[i] · ΔW(adapters[i])`` on every module holding one of them."""
    configs = [tuner.peft_config[name] for name in adapters]
    layers = {key: m for key, m in tuner.model.named_modules() if isinstance(m, BLoRALayer)}
    merged = sorted(key for key, layer in layers.items() if any(name in layer.merged_adapters for name in adapters))
    if merged:
        raise ValueError(f"add_weighted_adapter: adapters are merged in {merged[0]!r}; call unmerge_adapter() first.")
    holding = {key for key, layer in layers.items() if any(name in layer.bal_A for name in adapters)}
    ranks = [config.r for config in configs]
    rank = sum(ranks)
    tuner.peft_config[adapter_name] = replace(
        configs[0],
        r=rank,
        lora_alpha=rank,  # scaling 1: the weights and each adapter's scaling are folded into B
        target_modules=holding,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        skip_indivisible=False,
        init_weights=True,
    )
    tuner.inject_adapter(tuner.model, adapter_name)
    lam = configs[0].balance_factor
    with torch.no_grad():
        for key in holding:
            layer = layers[key]
            a, b = layer.bal_A[adapter_name].weight, layer.bal_B[adapter_name].weight
            a.zero_()
            b.zero_()
            start = 0
            for name, weight, r in zip(adapters, weights, ranks, strict=True):
                rows = slice(start, start + lam * r)
                start += lam * r
                if name not in layer.bal_A:
                    continue  # this adapter does not touch the module: its block stays zero
                a[rows] = layer.bal_A[name].weight.to(a.dtype)
                b[:, rows] = (weight * layer.scaling[name] * layer.bal_B[name].weight.float()).to(b.dtype)
