"""One rank of the CPU data-parallel tests (``tests/test_distributed.py`` starts it with torchrun, gloo backend).

Trains each requested adapter type with ``transformers.Trainer`` on the tiny model and writes this rank's adapter
tensors to ``<out>/<method>-rank<r>.safetensors``. ``--no-allreduce`` turns off the summing of GradApprox's gradient
sketches over ranks (to show that the test detects it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safetensors.torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainer_run import TokenDataset, adapter_state, make_trainer, peft_model, training_args  # noqa: E402

from peft_balanced import GradApproxInitCallback  # noqa: E402
from peft_balanced.tuners.gradapprox import estimate  # noqa: E402


def fsdp2_sgd(model, batch_size: int, steps: int, path: Path) -> None:
    """Shard every decoder layer and the root with FSDP2 (``fully_shard``; adapter weights become DTensors), run
    ``steps`` SGD steps on this rank's slice of the global batch, write the gathered full adapter from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if p.requires_grad and type(p.data).__name__ == "DTensor"]
    assert sharded, "FSDP2 did not shard the adapter weights"
    sgd_steps(model, batch_size, steps, rank, world)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items() if ".bal_" in k}, str(path))


def sgd_steps(model, batch_size: int, steps: int, rank: int = 0, world: int = 1) -> None:
    """A plain loop: step ``t`` uses examples ``[t·b·world + rank·b, ... + b)`` of ``TokenDataset()``; SGD, lr 0.5."""
    import torch

    data = TokenDataset()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        start = step * batch_size * world + rank * batch_size
        items = [data[i] for i in range(start, start + batch_size)]
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--methods", nargs="+", default=["blora", "gradapprox"])
    parser.add_argument("--no-allreduce", action="store_true")
    parser.add_argument("--fsdp2", action="store_true", help="a plain SGD loop under FSDP2 instead of the Trainer")
    args = parser.parse_args()
    if args.no_allreduce:
        estimate._all_reduce = lambda sketches: None
    rank = int(os.environ.get("RANK", "0"))
    for method in args.methods:
        model = peft_model(method)
        callbacks = [GradApproxInitCallback(progress=False)] if method == "gradapprox" else []
        if args.fsdp2:
            fsdp2_sgd(model, args.batch_size, args.steps, Path(args.out) / f"{method}-fsdp2.safetensors")
            continue
        train_args = training_args(
            str(Path(args.out) / f"run-{method}"), batch_size=args.batch_size, steps=args.steps, ddp_backend="gloo"
        )
        trainer = make_trainer(model, train_args, TokenDataset(), callbacks=callbacks)
        trainer.train()
        assert trainer.args.world_size == int(os.environ.get("WORLD_SIZE", "1")), trainer.args.world_size
        state = {k: v.contiguous() for k, v in adapter_state(model).items()}
        safetensors.torch.save_file(state, str(Path(args.out) / f"{method}-rank{rank}.safetensors"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
