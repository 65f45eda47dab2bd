"""The decode loop of benchmarks/kernels/int4_decode.py (static cache, one fixed-address step per token) on tiny Llamas."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tiny import tiny_llama

from peft_balanced import quantize_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = pathlib.Path("benchmarks", "kernels")
sys.path.insert(0, str(ROOT / KERNELS))

import int4_decode  # noqa: E402


def _generate(model, prompt, new_tokens):
    with torch.inference_mode():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.mark.parametrize("quantized", [False, True])
def test_static_cache_decode_gives_the_tokens_of_greedy_generate(quantized):
    model = tiny_llama(initializer_range=0.2)  # large weights: decisive logits, no near-ties
    if quantized:
        quantize_model(model, (4, 8))
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    ids, seconds = int4_decode.static_greedy(model, prompt, new_tokens=12)
    expected = _generate(model, prompt, 12)
    assert ids.shape == (1, 19) and seconds > 0
    assert torch.equal(ids, expected)


@pytest.mark.slow  # inductor compiles the step on CPU
def test_a_compiled_step_gives_the_tokens_of_greedy_generate_on_a_quantized_model():
    model = quantize_model(tiny_llama(initializer_range=0.2), (4, 8))
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    ids, _ = int4_decode.static_greedy(model, prompt, new_tokens=8, forward=forward)
    assert torch.equal(ids, _generate(model, prompt, 8))


def test_generate_with_a_static_cache_is_timed_in_new_tokens_per_second():
    model = quantize_model(tiny_llama(), (4, 8))
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    assert int4_decode.generate_tok_s(model, prompt, new_tokens=4, repeats=1) > 0


def test_a_batch_of_prompts_decodes_each_as_if_alone():
    model = quantize_model(tiny_llama(initializer_range=0.2), (4, 8))
    prompts = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    ids, _ = int4_decode.static_greedy(model, prompts, new_tokens=10)
    alone = torch.cat([int4_decode.static_greedy(model, p[None], new_tokens=10)[0] for p in prompts])
    assert ids.shape == (2, 16)
    assert torch.equal(ids, alone)


def test_build_model_makes_random_weights_in_the_dtype_on_the_device():
    config = int4_decode.LlamaConfig(**int4_decode.TINY)
    model = int4_decode.build_model(config, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


@pytest.mark.slow
def test_tiny_cpu_smoke_run_prints_the_table_with_every_model():
    done = subprocess.run(
        [sys.executable, str(ROOT / KERNELS / "int4_decode.py"), "--tiny", "--new-tokens", "8", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout.split("vs bf16")[-1]
    assert all(name in table for name in ("bf16", "int4", "nf4"))
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["model"] for row in rows] == ["bf16", "int4", "nf4"]
    assert all(row["generate_agreement"] == "8/8" and row["tok_s"] > 0 for row in rows)
