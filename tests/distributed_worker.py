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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--methods", nargs="+", default=["blora", "gradapprox"])
    parser.add_argument("--no-allreduce", action="store_true")
    args = parser.parse_args()
    if args.no_allreduce:
        estimate._all_reduce = lambda sketches: None
    rank = int(os.environ.get("RANK", "0"))
    for method in args.methods:
        model = peft_model(method)
        callbacks = [GradApproxInitCallback(progress=False)] if method == "gradapprox" else []
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
