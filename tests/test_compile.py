"""compile_for_training: regional torch.compile of the decoder layers, with no graph breaks inside a layer and the
same training numerics as eager (bf16: bit for bit; float32: within reassociation error)."""

import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from tiny import LLAMA_TARGETS, tiny_llama
from torch._dynamo.utils import counters

import peft_balanced
from peft_balanced import compile_for_training
from peft_balanced.compilation import decoder_layers

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def adapted(method: str, dtype: torch.dtype = torch.float32, device: str = "cpu", layers: int = 2):
    base = tiny_llama(num_hidden_layers=layers).to(device, dtype)
    if method == "qablora":
        peft_balanced.quantize_model(base, tile=(4, 8))
        config = peft_balanced.QABLoRAConfig(tile=(4, 8), target_modules=LLAMA_TARGETS, init_weights=False)
    elif method == "qblora":
        from peft_balanced.demo.models import quantize_linear_nf4

        quantize_linear_nf4(base, compute_dtype=dtype, double_quant=True)
        config = peft_balanced.BLoRAConfig(r=4, balance_factor=2, target_modules=LLAMA_TARGETS, init_weights=False)
    else:
        config = peft_balanced.BLoRAConfig(r=4, balance_factor=2, target_modules=LLAMA_TARGETS, init_weights=False)
    model = get_peft_model(base, config)
    model.train()
    model.config.use_cache = False
    return model


def layer_inputs(model, input_ids):
    """The positional and keyword arguments the first decoder layer receives in a forward of ``input_ids``."""
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    model(input_ids=input_ids)
    handle.remove()
    return captured["args"], captured["kwargs"]


def train(model, steps: int = 3, checkpointing: bool = False):
    """``steps`` SGD steps on fixed random batches: the losses and the trained adapter weights."""
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def eager_and_compiled(method, dtype, checkpointing, device="cpu"):
    torch._dynamo.reset()  # every test compiles afresh: no guards left from other models
    counters.clear()
    eager = train(adapted(method, dtype, device), checkpointing=checkpointing)
    compiled = train(compile_for_training(adapted(method, dtype, device)), checkpointing=checkpointing)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers really ran compiled
    assert not counters["graph_break"]
    return eager, compiled


@pytest.mark.parametrize("method", ["blora", "qblora", "qablora"])
def test_decoder_layer_with_balanced_adapters_compiles_to_one_graph(method, input_ids):
    model = adapted(method, torch.bfloat16 if method == "qblora" else torch.float32)
    args, kwargs = layer_inputs(model, input_ids)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(decoder_layers(model)[0])(*args, **kwargs)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    # each adapted projection's fused add is traced into the graph as an autograd node (bitsandbytes adds its own)
    assert explanation.graphs[0].code.count("higher_order.autograd_function_apply(") >= 7


def test_decoder_layers_are_found_inside_a_peft_model():
    model = adapted("blora", layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_compile_for_training_returns_the_model_with_compiled_layers():
    model = adapted("blora")
    assert compile_for_training(model) is model
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))


def test_compile_for_training_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of .*'reduce-overhead'.*got 'fast'"):
        compile_for_training(adapted("blora"), mode="fast")


def test_compile_for_training_rejects_a_dynamic_that_is_not_a_bool_or_none():
    with pytest.raises(ValueError, match="dynamic must be None, True or False, got 'yes'"):
        compile_for_training(adapted("blora"), dynamic="yes")


def test_compile_for_training_rejects_a_fullgraph_that_is_not_a_bool():
    with pytest.raises(ValueError, match="fullgraph must be True or False, got 1"):
        compile_for_training(adapted("blora"), fullgraph=1)


def break_graph_in_attention(model):
    """A forward hook that dynamo cannot trace, inside every decoder layer's attention."""

    def hook(module, args, output):
        torch._dynamo.graph_break()

    for layer in decoder_layers(model):
        layer.self_attn.register_forward_hook(hook)


def test_a_layer_that_cannot_compile_whole_raises_at_its_first_call(input_ids):
    torch._dynamo.reset()
    model = adapted("blora")
    break_graph_in_attention(model)
    compile_for_training(model)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(input_ids=input_ids)


def test_fullgraph_false_compiles_a_layer_between_its_graph_breaks(input_ids):
    torch._dynamo.reset()
    counters.clear()
    model = adapted("blora")
    break_graph_in_attention(model)
    compile_for_training(model, fullgraph=False)
    model(input_ids=input_ids)
    assert counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["blora", "qblora", "qablora"])
def test_a_dynamic_compiled_model_evaluates_new_lengths_without_grad_then_trains(method):
    torch._dynamo.reset()
    counters.clear()
    model = compile_for_training(adapted(method), dynamic=True)
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.randint(0, 128, (2, n))).logits for n in (5, 8)]
    model.train()
    ids = torch.randint(0, 128, (2, 7))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [t.shape[1] for t in logits] == [5, 8]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]


def test_compile_for_training_rejects_a_model_without_repeated_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="found no repeated decoder layers in Sequential"):
        compile_for_training(model)


# Before torch 2.13 the CPU inductor does not honour emulate_precision_casts: a plain transformers Llama without any
# adapter, compiled in bf16, already differs from eager (6.9e-3 of the largest logit on torch 2.11), so bit-identity
# on the CPU holds from 2.13 on. Older torch is covered by the float32 bound below and, on CUDA, by bit-identity.
CPU_EMULATES_PRECISION_CASTS = pytest.mark.skipif(
    Version(torch.__version__).release < (2, 13),
    reason="torch < 2.13's CPU inductor ignores emulate_precision_casts (plain transformers models differ too)",
)


@pytest.mark.slow
@CPU_EMULATES_PRECISION_CASTS
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["blora", "qablora"])
def test_compiled_bf16_training_is_bit_identical_to_eager(method, checkpointing):
    # emulate_precision_casts (compile_for_training's default) rounds every fused intermediate to bf16 as eager does
    (eager_losses, eager_weights), (losses, weights) = eager_and_compiled(method, torch.bfloat16, checkpointing)
    assert torch.equal(losses, eager_losses)
    for name, weight in weights.items():
        assert torch.equal(weight, eager_weights[name]), name


@pytest.mark.slow
@CPU_EMULATES_PRECISION_CASTS
def test_a_compiled_bf16_model_without_adapters_is_bit_identical_to_eager_on_cpu():
    # the reference point of the skip above: where this holds, any difference in the adapted tests is ours
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = tiny_llama().to(torch.bfloat16)
    torch.manual_seed(0)
    compiled = compile_for_training(tiny_llama().to(torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, eager(input_ids=ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["blora", "qablora"])
def test_compiled_float32_training_matches_eager_within_reassociation_error(method, checkpointing):
    # Inductor fuses and reorders float32 sums (RMSNorm, softmax, the group sums of the adapter's backward), so
    # results differ by rounding: a reordered sum of n terms is within n·eps·sum|terms| of the other order. With
    # n <= 128 here, eps = 1.2e-7, that is 1.5e-5 of the magnitudes summed; we allow 1e-5 of each tensor's largest
    # entry (measured: <= 1.1e-6 after 3 SGD steps, losses equal).
    (eager_losses, eager_weights), (losses, weights) = eager_and_compiled(method, torch.float32, checkpointing)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
    for name, weight in weights.items():
        reference = eager_weights[name]
        torch.testing.assert_close(weight, reference, rtol=0, atol=1e-5 * reference.abs().max().item(), msg=name)


@CUDA
@pytest.mark.parametrize("method", ["blora", "qblora", "qablora"])
def test_compiled_bf16_training_is_bit_identical_to_eager_on_cuda(method):
    # On CUDA the NF4 bases run the fast path (peft_balanced::nf4_linear under compile) and tile-INT4 the Triton
    # dequantize; inductor's own Triton kernels replace the fused pointwise / reductions.
    (eager_losses, eager_weights), (losses, weights) = eager_and_compiled(method, torch.bfloat16, False, "cuda")
    assert torch.equal(losses, eager_losses)
    for name, weight in weights.items():
        assert torch.equal(weight, eager_weights[name]), name


def test_peft_lora_model_compiles_too():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert len(decoder_layers(compile_for_training(model))) == 2
