"""GGUF Q4_1 export of TileInt4 Llama models: the block layout, transformers' round trip, QA-BLoRA merges, errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama, tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from peft_balanced import QABLoRAConfig
from peft_balanced.export.gguf import export_gguf, infer_pre_tokenizer, llama_qk_row_order, tile_int4_to_q4_1
from peft_balanced.quant import TileInt4Linear, quantize_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Add the two numbers: 12 + 34 = 46",
    "hello world, hello there! {braces} [brackets] <angles>",
]
TEXTS = ["the quick brown fox", "hello  world\n12+34", "<s> x </s>", "zzz ~~~ \n\n"]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE over printable ASCII, 3 specials and 29 merges (128 ids), adding BOS."""
    alphabet = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # byte-level spellings of " " and "\n"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=128, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tokenizer


def q4_1_llama(tile=(32, 1), seed=0, **overrides) -> nn.Module:
    """tiny_llama (dims multiples of 32) quantized to tiles that fit Q4_1, with fp16 alpha and beta."""
    return quantize_model(tiny_llama(seed, **overrides), tile=tile, scale_dtype="float16", zero_dtype="float16")


def load_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def assert_same_weights(loaded: nn.Module, model: nn.Module) -> None:
    """Every weight of ``model`` equals ``loaded``'s plain float one (TileInt4 layers dequantized in float32)."""
    loaded_modules = dict(loaded.named_modules())
    compared = 0
    for name, source in model.named_modules():
        if isinstance(source, TileInt4Linear):
            expected = source.dequantize(torch.float32)
        elif isinstance(getattr(source, "weight", None), torch.Tensor):
            expected = source.weight
        else:
            continue
        weight = loaded_modules[name].weight
        assert weight.dtype == torch.float32 and torch.equal(weight, expected), name
        compared += 1
    assert compared == 2 * 9 + 3  # per layer 7 projections + 2 norms; embeddings, final norm, lm_head


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- the Q4_1 block layout


@pytest.mark.parametrize("tile", [(32, 1), (64, 1), (96, 1)])
def test_q4_1_blocks_dequantize_with_gguf_to_exactly_the_tile_int4_weight(tile):
    torch.manual_seed(0)
    linear = nn.Linear(192, 48, bias=False)
    with torch.no_grad():
        linear.weight[3] += 2.5  # a row far from zero: the minimum m matters
        linear.weight[5, : tile[0]] = 0.75  # a constant tile: d = 0
    layer = TileInt4Linear.from_linear(linear, tile, scale_dtype="float16", zero_dtype="float16")  # Q4_1's d, m
    blocks = tile_int4_to_q4_1(layer, "layer")
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 192 // 32 * 20)
    restored = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(restored, layer.dequantize(torch.float32).numpy())


def test_q_k_row_order_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    gguf_rows = rows[llama_qk_row_order(64, 4)].numpy()
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    undone = processor.process(weights=gguf_rows, name="blk.0.attn_q.weight").weights
    assert np.array_equal(undone, rows.numpy()) and not np.array_equal(gguf_rows, rows.numpy())


# ---------------------------------------------------------------- round trip through transformers


@pytest.mark.parametrize("tile", [(32, 1), (64, 1)])
def test_exported_model_loads_in_transformers_with_identical_weights_and_logits(tile, tmp_path, input_ids):
    model = q4_1_llama(tile)
    path = export_gguf(model, bpe_tokenizer(), tmp_path / "model.gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_1
    assert types["token_embd.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    loaded = load_gguf(path)
    assert all(type(m) is not TileInt4Linear for m in loaded.modules())
    assert_same_weights(loaded, model)
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_write_no_output_tensor_and_reload_tied(tmp_path, input_ids):
    model = q4_1_llama(tie_word_embeddings=True)
    path = export_gguf(model, None, tmp_path / "tied.gguf")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    loaded = load_gguf(path)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_its_float_tensors_exact_as_bf16(tmp_path):
    model = q4_1_llama().to(torch.bfloat16)
    path = export_gguf(model, None, tmp_path / "bf16.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    embedding = gguf.quants.dequantize(tensors["token_embd.weight"].data, gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(embedding, model.model.embed_tokens.weight.detach().float().numpy())


def test_merged_qablora_model_exports_with_the_merged_outputs(tmp_path, input_ids):
    base_logits = logits(q4_1_llama(), input_ids)
    config = QABLoRAConfig(tile=(32, 1), lora_alpha=2.0, target_modules=LLAMA_TARGETS, init_weights=False)
    merged = get_peft_model(q4_1_llama(), config).merge_and_unload()
    expected = logits(merged, input_ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter changes the model
    loaded = load_gguf(export_gguf(merged, bpe_tokenizer(), tmp_path / "merged.gguf"))
    assert_same_weights(loaded, merged)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_is_rebuilt_by_transformers_from_the_gguf(tmp_path):
    tokenizer = bpe_tokenizer()
    path = export_gguf(q4_1_llama(), tokenizer, tmp_path / "tok.gguf")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert rebuilt(text)["input_ids"] == ids and ids[0] == tokenizer.bos_token_id
        assert rebuilt.decode(ids) == tokenizer.decode(ids)
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.pad_token) == ("<s>", "</s>", "<pad>")
    messages = [{"role": "user", "content": "hi"}]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_pre_tokenizer_names_are_inferred_from_known_shapes():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    no_regex = dict(byte_level, use_regex=False)
    assert infer_pre_tokenizer(byte_level) == "gpt2"
    assert infer_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    assert infer_pre_tokenizer({"type": "Sequence", "pretokenizers": [split, no_regex]}) == "llama-bpe"
    assert infer_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, no_regex]}) is None


def test_unknown_pre_tokenizer_asks_for_its_llama_cpp_name(tmp_path):
    tokenizer = bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(ValueError, match=r"pre_tokenizer=NAME"):
        export_gguf(q4_1_llama(), tokenizer, tmp_path / "x.gguf")
    path = export_gguf(q4_1_llama(), tokenizer, tmp_path / "x.gguf", pre_tokenizer="gpt2")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt2"


def test_non_bpe_tokenizer_is_rejected_with_the_supported_kind(tmp_path):
    with pytest.raises(ValueError, match=r"byte-level BPE.*WordLevel.*tokenizer=None"):
        export_gguf(q4_1_llama(), tiny_tokenizer(), tmp_path / "x.gguf")
    assert files_in(tmp_path) == []


@pytest.mark.slow
def test_smollm2_exports_with_its_tokenizer_and_reloads_with_the_same_logits(tmp_path):
    from peft_balanced.demo.models import load_default_model

    model, tokenizer = load_default_model(torch.float32)
    quantize_model(model, tile=(32, 1), scale_dtype="float16", zero_dtype="float16")
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.gguf")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "The capital of France is Paris. 12 + 34 = 46 <|im_end|>"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert rebuilt(text)["input_ids"] == ids[0].tolist()
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt2"
    loaded = load_gguf(path)
    assert torch.equal(
        loaded.model.layers[7].self_attn.k_proj.weight, model.model.layers[7].self_attn.k_proj.dequantize()
    )
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- what cannot be exported


@pytest.mark.parametrize(
    ("tile", "match"),
    [
        ((4, 8), r"'model.layers.0.self_attn.q_proj'.*tile=\(4, 8\).*l2=8 outputs.*\(32, 1\), \(64, 1\)"),
        ((16, 1), r"'model.layers.0.self_attn.q_proj'.*tile=\(16, 1\).*l1=16 inputs.*\(32\*k, 1\)"),
    ],
)
def test_tile_that_does_not_fit_q4_1_blocks_is_rejected_naming_module_and_valid_tiles(tile, match, tmp_path):
    model = quantize_model(tiny_llama(), tile=tile, scale_dtype="float16", zero_dtype="float16")
    with pytest.raises(ValueError, match=match):
        export_gguf(model, None, tmp_path / "bad.gguf")
    assert files_in(tmp_path) == []


def test_fp32_zero_points_not_exact_in_fp16_are_rejected_not_rounded(tmp_path):
    model = quantize_model(tiny_llama(), tile=(32, 1), scale_dtype="float16", zero_dtype="float32")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.*zero \(beta\) is float32.*zero_dtype="):
        export_gguf(model, None, tmp_path / "bad.gguf")
    assert files_in(tmp_path) == []


def test_model_without_tile_int4_layers_is_written_as_float_only_when_asked(tmp_path, input_ids):
    model = tiny_llama()
    path = export_gguf(model, None, tmp_path / "float.gguf", allow_float=True)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.F32}
    torch.testing.assert_close(logits(load_gguf(path), input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_fp32_buffers_holding_fp16_values_are_exported(tmp_path, input_ids):
    model = q4_1_llama()
    layer = model.model.layers[0].mlp.up_proj
    layer.scale, layer.zero = layer.scale.float(), layer.zero.float()
    loaded = load_gguf(export_gguf(model, None, tmp_path / "m.gguf"))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, layer.dequantize(torch.float32))


def test_attached_adapter_must_be_merged_first(tmp_path):
    config = QABLoRAConfig(tile=(32, 1), target_modules=LLAMA_TARGETS)
    with pytest.raises(ValueError, match=r"adapter layers still attached.*merge_and_unload"):
        export_gguf(get_peft_model(q4_1_llama(), config), None, tmp_path / "x.gguf")


def test_existing_file_is_kept_unless_overwrite(tmp_path, input_ids):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(q4_1_llama(), None, path)
    assert path.read_bytes() == b"keep me" and files_in(tmp_path) == ["model.gguf"]
    model = q4_1_llama()
    export_gguf(model, None, path, overwrite=True)
    assert files_in(tmp_path) == ["model.gguf"]  # no temporary file left behind
    torch.testing.assert_close(logits(load_gguf(path), input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_exported_file_gets_the_usual_permissions_not_those_of_a_private_temp_file(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    path = export_gguf(q4_1_llama(), None, tmp_path / "m.gguf")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_non_llama_model_is_rejected():
    with pytest.raises(ValueError, match=r"Llama-architecture.*Sequential"):
        export_gguf(nn.Sequential(nn.Linear(64, 64)), None, "unused.gguf")


def test_missing_gguf_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'peft-balanced\[gguf\]'"):
        export_gguf(q4_1_llama(), None, tmp_path / "x.gguf")
