"""End-to-end greedy decode of a Llama-2-7B-shaped model (batch 1 or ``--batch B``): bf16, tile-INT4, bnb NF4.

    PYTHONUNBUFFERED=1 python benchmarks/kernels/int4_decode.py [--layers 32] [--new-tokens 128] [--graph cuda]
        [--compile] [--generate] [--batch 16]
    python benchmarks/kernels/int4_decode.py --tiny            # CPU smoke test (a tiny Llama, no CUDA graphs)

Random weights from a ``LlamaConfig`` (nothing is downloaded). The INT4 model is ``quantize_model`` of the same
random model (tile 4x8, fp16 scales, fp32 zero points: the defaults). A merged QA-BLoRA model is exactly such a
TileInt4 model (the merge only shifts the zero points), so its decode speed is this one's. Its kernel routes for one
token are measured first (``quant.kernels.route.tune_routes``). NF4 = bitsandbytes ``Linear4bit`` (blocksize 64, no
double quantization, bf16 compute).

Each model generates with a transformers ``StaticCache``: the prompt is one eager forward, then every one-token step
runs the model forward at a fixed address (``--graph cuda``: captured once in a ``torch.cuda.CUDAGraph`` and replayed;
``--graph none``: eager; a model whose capture fails is timed eager, with the error in its row). ``--compile``: the
step is ``torch.compile(fullgraph=True)``-d before it is captured (every model alike). Tokens/s counts the decode steps
only (prefill and capture excluded), median of ``--repeats`` runs after a warm-up run. Also printed: whether the graph
run's tokens equal those of the same (compiled or eager) step run without a graph, and how many of the eager static
loop's first 32 tokens agree with ``model.generate(do_sample=False)``'s. ``--generate`` also times what a user writes,
``model.generate(ids, cache_implementation="static", max_new_tokens=N)`` (transformers compiles the decode step; new
tokens per second of the whole call, prefill included, after one warm-up call).
Writes ``int4_decode_{eager,compiled}[_batchB].json`` under ``$OUT`` when set; the table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from peft_balanced import quantize_model
from peft_balanced.quant.kernels.route import tune_routes

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def build_model(config: LlamaConfig, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A random-weight Llama built straight on ``device`` in ``dtype``, in eval mode."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def weights_gib(model: torch.nn.Module) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30


@torch.inference_mode()
def static_greedy(
    model: LlamaForCausalLM,
    prompt: torch.Tensor,
    new_tokens: int,
    graph: bool = False,
    warmup: int = 2,
    forward=None,
) -> tuple[torch.Tensor, float]:
    """Greedy decode of ``new_tokens`` tokens after ``prompt (B, P)`` with a ``StaticCache``.

    Returns ``(ids (B, P + new_tokens), seconds of the decode steps)``. With ``graph`` (CUDA), the one-token step is
    captured once in a CUDA graph (after ``warmup`` eager steps on a side stream) and replayed for every token.
    ``forward`` (default ``model``) runs the one-token step (a compiled ``model.forward``, say).
    """
    device, (batch, length) = prompt.device, prompt.shape
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
    positions = torch.arange(length, device=device)[None]
    logits = model(input_ids=prompt, cache=cache, position_ids=positions, use_cache=True).logits[:, -1]
    out = [logits.argmax(-1)]
    token = out[0].view(batch, 1).clone()  # the step's inputs live at fixed addresses (graph replay reads them)
    position = torch.full((batch, 1), length, dtype=torch.long, device=device)

    forward = forward or model

    def step() -> torch.Tensor:
        return forward(input_ids=token, cache=cache, position_ids=position, use_cache=True).logits[:, -1]

    def rewind() -> None:  # warm-up steps advanced the cache's write position: back to just after the prompt
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)

    run = step
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
                rewind()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            graph_logits = step()
        rewind()

        def run() -> torch.Tensor:
            captured.replay()
            return graph_logits

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        token.copy_(out[-1].view(batch, 1))
        position.fill_(length + i)
        out.append(run().argmax(-1))
    sync()
    seconds = time.perf_counter() - start
    return torch.cat([prompt, torch.stack(out, dim=1)], dim=1), seconds


def greedy(new_tokens: int, **extra) -> dict:
    """``generate`` keyword arguments for exactly ``new_tokens`` greedy tokens (plus ``extra``)."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)


def tokens_agreeing_with_generate(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int) -> int:
    """How many leading new tokens of the eager static-cache loop equal ``model.generate(do_sample=False)``'s
    (``new_tokens`` when all do). Random weights give near-tied logits, and ``generate``'s dynamic cache runs attention
    over fewer keys than the static one, so a late divergence on a GPU can be a rounding tie, not a bug."""
    ids, _ = static_greedy(model, prompt, new_tokens)
    with torch.inference_mode():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), **greedy(new_tokens))
    differs = (ids != expected)[:, prompt.shape[1] :].any(0).nonzero()
    return int(differs[0, 0]) if len(differs) else new_tokens


@torch.inference_mode()
def generate_tok_s(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """New tokens per second (all sequences) of ``model.generate(cache_implementation="static")`` (prefill included),
    median of ``repeats`` calls after a warm-up call (which compiles the decode step on a GPU)."""
    kwargs = greedy(new_tokens, cache_implementation="static")
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    model.generate(prompt, **kwargs)
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        sync()
        seconds.append(time.perf_counter() - start)
    return prompt.shape[0] * new_tokens / statistics.median(seconds)


def make_variants(model: LlamaForCausalLM, names: list[str], device: str, batch: int = 1) -> dict:
    """``name -> (model, context)``; every quantized model is a copy of ``model`` (the same random weights)."""
    variants = {}
    for name in names:
        if name == "bf16":
            variants[name] = (model, nullcontext)
        elif name == "int4":
            int4 = quantize_model(copy.deepcopy(model), (4, 8))
            if device == "cuda":
                tune_routes(int4, tokens=sorted({1, batch}))
            variants[name] = (int4, nullcontext)
        elif name == "nf4":
            from peft_balanced.demo.models import quantize_linear_nf4

            nf4 = copy.deepcopy(model)
            quantize_linear_nf4(nf4, compute_dtype=next(model.parameters()).dtype)
            variants[name] = (nf4.to(device), nullcontext)
        else:
            raise ValueError(f"unknown variant {name!r}; valid: bf16, int4, nf4")
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on CPU (smoke test; no CUDA graphs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32, or 2 with --tiny)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graph", choices=["cuda", "none"], default=None, help="default: cuda on a GPU")
    parser.add_argument("--variants", default=None, help="comma list of bf16, int4, nf4")
    parser.add_argument("--compile", action="store_true", help="torch.compile the one-token step (every model)")
    parser.add_argument("--generate", action="store_true", help="also time model.generate with a static cache")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    graph = (args.graph or ("cuda" if cuda else "none")) == "cuda"
    if graph and not cuda:
        print("--graph cuda needs a CUDA GPU")
        return 2
    if args.batch < 1:
        print(f"--batch must be at least 1, got {args.batch}")
        return 2
    config = LlamaConfig(**(TINY if args.tiny else LLAMA2_7B))
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    names = (args.variants or "bf16,int4,nf4").split(",")
    dtype = torch.bfloat16
    model = build_model(config, device, dtype)
    variants = make_variants(model, names, device, args.batch)
    shape = (args.batch, args.prompt)
    prompt = torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, layers "
        f"{config.num_hidden_layers}, hidden {config.hidden_size}, graph {graph}, compile {args.compile}",
        flush=True,
    )
    rows = []
    for name, (variant, context) in variants.items():
        captured, error, check = graph, None, min(args.new_tokens, 32)
        forward = torch.compile(variant.forward, fullgraph=True, dynamic=False) if args.compile else None
        with context():
            start = time.perf_counter()
            try:  # the same step without a graph: what a replay must equal (compiles the step and the kernels)
                eager_ids, _ = static_greedy(variant, prompt, args.new_tokens, forward=forward)
                static_greedy(variant, prompt, args.new_tokens, graph=graph, forward=forward)  # warm-up
            except RuntimeError as exc:  # capture or compile failed (a host sync, a graph break): time eager steps
                captured, forward, error = False, None, f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"{name}: CUDA graph capture or compile failed, timing eager steps instead: {error}", flush=True)
                eager_ids, _ = static_greedy(variant, prompt, args.new_tokens)
            warm_s = time.perf_counter() - start
            runs = [
                static_greedy(variant, prompt, args.new_tokens, graph=captured, forward=forward)
                for _ in range(args.repeats)
            ]
            generate = generate_tok_s(variant, prompt, args.new_tokens, args.repeats) if args.generate else None
        seconds = statistics.median(s for _, s in runs)
        row = {
            "model": name,
            "graph": captured,
            "compiled": forward is not None,
            "graph_error": error,
            "weights_gib": weights_gib(variant),
            "tok_s": args.batch * (args.new_tokens - 1) / seconds,
            "ms_per_token": seconds * 1e3 / (args.new_tokens - 1),
            "warm_up_s": warm_s,
            "graph_equals_eager": all(torch.equal(ids, eager_ids) for ids, _ in runs) if captured else None,
            "generate_tok_s": generate,
            "generate_agreement": f"{tokens_agreeing_with_generate(variant, prompt, check)}/{check}",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["tok_s"] for r in rows if r["model"] == "bf16"), None)
    print(
        f"\nbatch-{args.batch} greedy decode (tok/s: new tokens of all sequences), prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, static cache, "
        f"{'CUDA graph' if graph else 'eager'}{', compiled' if args.compile else ''}, median of {args.repeats}"
    )
    gen_base = next((r["generate_tok_s"] for r in rows if r["model"] == "bf16"), None)
    print(
        f"{'model':<12} {'weights GiB':>11} {'step':>10} {'ms/token':>9} {'tok/s':>9} {'vs bf16':>8} "
        f"{'generate tok/s':>15} {'vs bf16':>8}"
    )
    for r in rows:
        r["speedup_vs_bf16"] = r["tok_s"] / base if base else None
        speedup = f"{r['speedup_vs_bf16']:.2f}x" if base else "-"
        step = ("graph" if r["graph"] else "eager") + ("+comp" if r["compiled"] else "")
        gen, gen_speedup = "-", "-"
        if r["generate_tok_s"]:
            gen = f"{r['generate_tok_s']:.1f}"
            gen_speedup = f"{r['generate_tok_s'] / gen_base:.2f}x" if gen_base else "-"
        print(
            f"{r['model']:<12} {r['weights_gib']:>11.2f} {step:>10} {r['ms_per_token']:>9.2f} {r['tok_s']:>9.1f} "
            f"{speedup:>8} {gen:>15} {gen_speedup:>8}"
        )
    if os.environ.get("OUT"):
        tag = ("compiled" if args.compile else "eager") + (f"_batch{args.batch}" if args.batch > 1 else "")
        with open(os.path.join(os.environ["OUT"], f"int4_decode_{tag}.json"), "w") as handle:
            json.dump({"args": vars(args), "graph": graph, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
