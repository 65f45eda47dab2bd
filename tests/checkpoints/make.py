"""Write the checkpoints of ``tests/test_checkpoint_compat.py`` (run once per file-format version, from the repo root).

    python tests/checkpoints/make.py tests/checkpoints/v0.1.0

Writes a tiny float base model (fp16), its tile-INT4 quantization, a BLoRA, a QA-BLoRA and a GradApprox adapter with
non-zero weights, and ``expected.safetensors``: the logits each gives on fixed tokens. A later version must load these
unchanged; never regenerate a directory that a release has shipped, add a new one instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import safetensors.torch
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny import LLAMA_TARGETS, tiny_llama  # noqa: E402

import peft_balanced  # noqa: E402
from peft_balanced import BLoRAConfig, GradApproxConfig, QABLoRAConfig, quantize_model  # noqa: E402

TOKENS = torch.arange(24).reshape(2, 12) % 128


def _randomize(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def main(out: Path) -> None:
    if out.exists():
        raise SystemExit(f"{out} exists: checkpoints of a shipped version are never rewritten; pick a new directory")
    tiny_llama().to(torch.float16).save_pretrained(out / "base")
    float_base = lambda: AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)  # noqa: E731
    quantize_model(float_base(), tile=(4, 8)).save_pretrained(out / "tile_int4")
    int4_base = lambda: AutoModelForCausalLM.from_pretrained(out / "tile_int4")  # noqa: E731
    adapters = {
        "blora": (float_base, BLoRAConfig(r=4, balance_factor=2, target_modules=LLAMA_TARGETS)),
        "qablora": (int4_base, QABLoRAConfig(tile=(4, 8), target_modules=LLAMA_TARGETS)),
        "gradapprox": (float_base, GradApproxConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    }
    expected = {"tokens": TOKENS, "tile_int4": _logits(int4_base())}
    for seed, (name, (base, config)) in enumerate(adapters.items()):
        model = _randomize(get_peft_model(base(), config), seed)
        model.save_pretrained(out / name)
        expected[name] = _logits(model)
    safetensors.torch.save_file(
        expected, str(out / "expected.safetensors"), metadata={"version": peft_balanced.__version__}
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
