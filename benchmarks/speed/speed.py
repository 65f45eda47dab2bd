"""Training and inference speed of every adapter, side by side, on a Llama-2-7B-shaped model with random weights.

    PYTHONUNBUFFERED=1 python benchmarks/speed/speed.py                 # the H100 run of docs/benchmarks.md
    python benchmarks/speed/speed.py --tiny                             # a CPU smoke run of the harness (seconds)
    python benchmarks/speed/speed.py --compile off,default              # each training method eager and compiled

``--compile`` (a comma list of ``off``, ``default``, ``reduce-overhead``) trains every method once per setting, the
compiled ones through ``peft_balanced.compile_for_training`` (each decoder layer compiled; the first rounds include
the compile, so raise ``--warmup`` to keep it out of the medians). Rows carry ``compile`` and the process's dynamo
graph-break / recompile counts.

Training (one process, one GPU, batch ``--batch`` x ``--seq`` tokens, AdamW, gradient checkpointing on and off):
peft LoRA on bf16, peft QLoRA on bitsandbytes NF4 (double quant, bf16 compute), BLoRA on bf16, Q-BLoRA on NF4,
QA-BLoRA on the INT4 tile format and GradApprox on bf16, rank ``--r`` on the 7 projections (equal trainable
parameters; QA-BLoRA's count is fixed by its tile, so ``qlora_match`` is QLoRA at the rank with QA-BLoRA's count).
``qblora_bnb`` is Q-BLoRA with the fast NF4 path switched off (bitsandbytes' own matmul_4bit), to attribute the gain.
Methods on the same kind of machine state are measured in interleaved rounds (one step of each per round, the order
rotating; every method has its own model), so slow drifts of the machine hit all alike; step time is the median over
``--steps`` rounds after ``--warmup``. Peak memory of a method = its own resident memory (weights, adapter,
optimizer state) + the transient peak of its timed steps (warm-up steps, which hold compilation and autotuning
buffers, are left out). Also: GradApprox's gradient estimation on the NF4 model (time, peak memory), the autograd
memory an adapter adds to one layer (LoRA vs BLoRA), and inference (prefill and batch-1 decode) of the bf16, NF4 and
INT4 models. Adapters use peft's default dtype (float32 weights); ``--adapter-dtype bf16`` casts them like TRL does.
Writes ``speed.json`` and ``speed.log`` under ``--out`` (default ``$OUT`` or ``.``); the table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
from models import BASE_OF, METHODS, adapter_config, build_model, qablora_param_count, random_batch
from peft import get_peft_model
from report import markdown_table

import peft_balanced
from peft_balanced.demo.models import LLAMA_PROJECTIONS

COMPILE_SETTINGS = ("off", "default", "reduce-overhead")
LINES: list[str] = []


def say(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


GROUPS = (("lora", "blora", "gradapprox"), ("qlora", "qblora", "qblora_bnb", "qlora_match", "qablora"))


class Trainee:
    """One adapted model with its optimizer; its own resident memory is the allocation growth while building it."""

    def __init__(self, method: str, args, qablora_params: int, compile_mode: str = "off") -> None:
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        self.method, self.args, self.compile_mode = method, args, compile_mode
        self.model = get_peft_model(build_model(args, BASE_OF[method]), adapter_config(method, args, qablora_params))
        if args.adapter_dtype == "bf16":
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        if compile_mode != "off":
            # peft's bitsandbytes layers break the graph (fullgraph=False compiles between the breaks); ours must not
            whole = method not in ("qlora", "qlora_match", "qblora_bnb")
            peft_balanced.compile_for_training(self.model, mode=compile_mode, dynamic=False, fullgraph=whole)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.model.train()
        self.batch = random_batch(args, torch.Generator().manual_seed(1))
        self.times: list[float] = []
        self.losses: list[float] = []
        self.transient = 0
        self.before = before

    def set_checkpointing(self, on: bool) -> None:
        base = self.model.get_base_model()
        if on:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_disable()
        self.times, self.losses, self.transient = [], [], 0

    def step(self, timed: bool) -> None:
        preference = "bitsandbytes" if self.method == "qblora_bnb" else peft_balanced.get_kernel_preference()
        with peft_balanced.kernel_preference(preference):
            sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            start = time.perf_counter()
            if self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new training step: CUDA-graph outputs may be reused
            loss = self.model(**self.batch).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync()
            elapsed = time.perf_counter() - start
        if timed:  # warm-up steps hold compilation and autotuning buffers: not the method's own memory
            self.times.append(elapsed)
            if torch.cuda.is_available():
                self.transient = max(self.transient, torch.cuda.max_memory_allocated() - allocated)
        self.losses.append(loss.item())

    def row(self, gc_on: bool, resident: int, gpu_s: float | None) -> dict:
        step_s = statistics.median(self.times)
        return {
            "method": self.method,
            "base": BASE_OF[self.method],
            "compile": self.compile_mode,
            "gc": gc_on,
            "trainable": self.trainable,
            "step_s": step_s,
            "step_s_min": min(self.times),
            "step_s_max": max(self.times),
            "tok_s": self.args.batch * self.args.seq / step_s,
            "resident_gib": gib(resident),
            "peak_gib": gib(resident + self.transient),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "gpu_kernel_s": gpu_s,
        }


def dynamo_counts() -> dict:
    """Graph breaks and distinct graphs dynamo has counted in this process so far."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
    }


def train_group(
    methods: list[str], gc_settings: list[bool], args, qablora_params: int, compile_mode: str = "off"
) -> list[dict]:
    """Step time of every method in the group, measured in interleaved rounds (one step of each method per round,
    the order rotating) so that drifts of the machine hit every method alike; medians over ``--steps`` rounds."""
    trainees = [Trainee(method, args, qablora_params, compile_mode) for method in methods]
    rows = []
    for gc_on in gc_settings:
        for trainee in trainees:
            trainee.set_checkpointing(gc_on)
        resident = {}
        for round_index in range(args.warmup + args.steps):
            shift = round_index % len(trainees)
            for trainee in trainees[shift:] + trainees[:shift]:
                trainee.step(timed=round_index >= args.warmup)
            if round_index == 0:  # optimizer states exist now
                resident = {t.method: own_resident(t, trainees) for t in trainees}
        for trainee in trainees:
            label = f"{trainee.method}, grad ckpt {gc_on}"
            gpu_s = (
                profile_step(trainee.model, trainee.optimizer, trainee.batch, label, args) if args.profile else None
            )
            if args.sync_debug:
                find_syncs(trainee.model, trainee.optimizer, trainee.batch, label, args)
            rows.append(trainee.row(gc_on, resident[trainee.method], gpu_s))
            if compile_mode != "off":
                rows[-1].update(dynamo_counts())
            say(json.dumps(rows[-1]))
    del trainees
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def own_resident(trainee: Trainee, trainees: list[Trainee]) -> int:
    """Bytes held by ``trainee``'s model, adapter and optimizer state (parameters, buffers, optimizer tensors)."""
    if not torch.cuda.is_available():
        return 0
    seen: set[int] = set()
    total = 0
    tensors = list(trainee.model.parameters()) + list(trainee.model.buffers())
    tensors += [v for state in trainee.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and tensor.is_cuda:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    for module in trainee.model.modules():  # bitsandbytes keeps absmax / codes on the weight's quant_state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for tensor in (state.absmax, state.code, *(() if state.state2 is None else (state.state2.absmax,))):
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return total


def profile_step(model, optimizer, batch, label: str, args) -> float:
    """Profile one training step; append the top kernels to ``profile.txt``; return the summed kernel time (s)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    # two steps under the profiler before the recorded one: a recompilation or autotuning that the profiler's
    # presence triggers (its L2 flushes and argument copies) then stays out of the table
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=1)) as prof:
        for _ in range(3):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            prof.step()
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6
    launches = sum(e.count for e in events if e.device_type.name == "CUDA")
    with open(os.path.join(args.out, "profile.txt"), "a") as handle:
        handle.write(f"\n=== {label}: summed kernel time {kernel_s:.3f} s, {launches} kernels ===\n")
        handle.write(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
        handle.write(f"\n--- {label}: host time, by self CPU time ---\n")
        handle.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return kernel_s


def find_syncs(model, optimizer, batch, label: str, args) -> None:
    """Append every distinct host-device synchronization of one training step (and where it came from) to sync.txt."""
    import traceback
    import warnings

    sync()
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-4:]
        key = f"{str(message).splitlines()[0][:100]} <- " + " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(stack)
        )
        found[key] = found.get(key, 0) + 1

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = previous
    with open(os.path.join(args.out, "sync.txt"), "a") as handle:
        handle.write(f"\n=== {label}: {sum(found.values())} synchronizations ===\n")
        for key, count in sorted(found.items(), key=lambda kv: -kv[1]):
            handle.write(f"{count:6d}  {key}\n")


def gradapprox_estimation(model, args) -> dict:
    """Time and peak memory of ``init_gradapprox`` (2 batches, 2 passes) on ``model`` with gradient checkpointing."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft_balanced.GradApproxConfig(r=args.r, lora_alpha=2 * args.r, target_modules=list(LLAMA_PROJECTIONS))
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(2)
    batches = [random_batch(args, generator) for _ in range(2)]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    peft_balanced.init_gradapprox(peft_model, batches, progress=False)
    sync()
    row = {
        "what": "gradapprox_estimation",
        "base": "nf4",
        "batches": 2,
        "seconds": time.perf_counter() - start,
        "peak_gib": gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0,
    }
    peft_model.unload()
    model.gradient_checkpointing_disable()
    say(json.dumps(row))
    return row


def adapter_activation_bytes(args) -> list[dict]:
    """Bytes autograd keeps for one up_proj-shaped layer with an adapter, beyond what the bare layer keeps."""
    rows = []
    d_in, d_out = args.hidden, args.inter
    tokens = args.batch * args.seq
    for method in ("lora", "blora"):
        layer = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False))
        layer.to(args.device, torch.bfloat16).requires_grad_(False)
        config = adapter_config(method, args)
        config.target_modules = ["0"]
        wrapped = get_peft_model(layer, config)
        x = torch.randn(tokens, d_in, device=args.device, dtype=torch.bfloat16, requires_grad=True)
        keep = [x, *wrapped.parameters()]  # inputs and weights are not activations
        rows.append({"what": "adapter_activation", "method": method, "bytes": saved_bytes(wrapped, x, exclude=keep)})
        wrapped.unload()
    for row in rows:
        say(json.dumps(row))
    return rows


def saved_bytes(module, x: torch.Tensor, exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves during ``module(x)``, not counting the storages of ``exclude``."""
    storages: dict[int, int] = {}
    excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@torch.no_grad()
def inference_speed(model, base: str, args) -> dict:
    """Prefill tok/s (batch 1 x ``--prefill`` tokens) and batch-1 greedy decode tok/s with a KV cache."""
    model.eval()
    model.config.use_cache = True
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=generator).to(args.device)
    for _ in range(2):
        model(prompt)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        model(prompt)
    sync()
    prefill_s = (time.perf_counter() - start) / args.steps
    short = prompt[:, :16]
    kwargs = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False)
    model.generate(short, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    sync()
    start = time.perf_counter()
    model.generate(short, **kwargs)
    sync()
    decode_s = time.perf_counter() - start
    model.config.use_cache = False
    row = {
        "what": "inference",
        "base": base,
        "prefill_tok_s": args.prefill / prefill_s,
        "decode_tok_s": args.decode_tokens / decode_s,
        "weights_gib": gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0,
    }
    say(json.dumps(row))
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--gc", default="on,off", help="gradient checkpointing settings to run: on, off or on,off")
    parser.add_argument(
        "--compile", default="off", help="comma list of off, default, reduce-overhead (compile_for_training modes)"
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--balance", type=int, default=2)
    parser.add_argument("--tile", type=int, nargs=2, default=(4, 8))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--adapter-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--skip", default="", help="comma list of parts to skip: train, estimation, activation, inference"
    )
    parser.add_argument("--profile", action="store_true", help="profile one step per method into profile.txt")
    parser.add_argument("--sync-debug", action="store_true", help="list host-device syncs of one step in sync.txt")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the harness, not speed")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.layers, args.hidden, args.inter, args.heads, args.vocab = 2, 256, 512, 4, 512
        args.batch, args.seq, args.r, args.steps, args.warmup = 2, 64, 8, 2, 1
        args.prefill, args.decode_tokens = 32, 4
    args.r_match_denominator = args.layers * (4 * 2 * args.hidden + 3 * (args.hidden + args.inter))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    gc_settings = [{"on": True, "off": False}[g] for g in args.gc.split(",") if g]
    compile_settings = [c for c in args.compile.split(",") if c]
    for setting in compile_settings:
        if setting not in COMPILE_SETTINGS:
            raise SystemExit(f"unknown --compile setting {setting!r}; valid: {', '.join(COMPILE_SETTINGS)}")
    if set(compile_settings) - {"off"}:
        import torch._dynamo.config as dynamo_config

        # every compiled model adds guards to the one decoder-layer code: keep dynamo from falling back to eager
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
        dynamo_config.fail_on_recompile_limit_hit = True  # never time a silent fallback to eager
    skip = set(filter(None, args.skip.split(",")))
    if torch.cuda.is_available():
        say(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, extras = [], []
    qablora_params = qablora_param_count(args)
    if "train" not in skip:
        for setting in compile_settings:
            for group in GROUPS:
                todo = [m for m in group if m in methods]
                if todo:
                    rows += train_group(todo, gc_settings, args, qablora_params, setting)
    for base in ("bf16", "int4", "nf4"):
        if {"inference", "estimation"} <= skip or (base != "nf4" and "inference" in skip):
            continue
        model = build_model(args, base)
        if base == "nf4" and "estimation" not in skip:
            extras.append(gradapprox_estimation(model, args))
        if "inference" not in skip:
            extras.append(inference_speed(model, base, args))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "activation" not in skip:
        extras += adapter_activation_bytes(args)
    table = markdown_table(rows, extras, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.json"), "w") as handle:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "train": rows, "other": extras}, handle, indent=1)
    for line in table:
        say(line)
    with open(os.path.join(args.out, "speed.log"), "w") as handle:
        handle.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
