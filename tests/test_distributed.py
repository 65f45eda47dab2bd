"""Data-parallel training on CPU: 2 processes (torchrun, gloo) train with ``transformers.Trainer``; both ranks end
with identical adapters equal to one process with the same global batch (per-device batch b on 2 ranks vs 2b on 1).

GradApprox's gradient initialization sums the sketches over ranks before the QR / SVD, so every rank gets the
initialization of the global batch; without that sum the ranks' adapters diverge (which the control test shows).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from trainer_run import TokenDataset, adapter_state, make_trainer, peft_model, training_args

from peft_balanced import GradApproxInitCallback

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
ROOT = WORKER.parent.parent
BATCH, STEPS = 2, 4


def _torchrun(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "--out", str(out), "--batch-size", str(BATCH), "--steps", str(STEPS), *extra]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _rank_states(out: Path, method: str) -> list[dict[str, torch.Tensor]]:
    return [safetensors.torch.load_file(str(out / f"{method}-rank{rank}.safetensors")) for rank in (0, 1)]


def _single_process(method: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    model = peft_model(method)
    callbacks = [GradApproxInitCallback(progress=False)] if method == "gradapprox" else []
    args = training_args(str(tmp_path / f"single-{method}"), batch_size=2 * BATCH, steps=STEPS)
    make_trainer(model, args, TokenDataset(), callbacks=callbacks).train()
    return adapter_state(model)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["blora", "gradapprox"])
def test_two_ranks_end_with_identical_adapters(two_rank_run, method):
    rank0, rank1 = _rank_states(two_rank_run, method)
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["blora", "gradapprox"])
def test_two_ranks_match_one_process_with_the_same_global_batch(two_rank_run, method, tmp_path):
    rank0, _ = _rank_states(two_rank_run, method)
    single = _single_process(method, tmp_path)
    initial = adapter_state(peft_model(method))
    assert rank0.keys() == single.keys()
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3  # training moved the adapter
    for key in single:
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_without_summing_the_sketches_gradapprox_ranks_diverge(tmp_path):
    _torchrun(tmp_path, "--methods", "gradapprox", "--no-allreduce")
    rank0, rank1 = _rank_states(tmp_path, "gradapprox")
    trained = [key for key in rank0 if key.endswith(".weight")]
    assert any(not torch.allclose(rank0[k], rank1[k], atol=1e-3) for k in trained)


@pytest.mark.slow
def test_fsdp2_sharded_blora_matches_one_process(tmp_path):
    """FSDP2 (``fully_shard`` per decoder layer; the adapter weights are sharded DTensors), plain SGD loop: the gathered
    adapter equals one process on the same global batch. (transformers' Trainer ignores ``fsdp=`` on CPU.)"""
    from distributed_worker import sgd_steps

    _torchrun(tmp_path, "--methods", "blora", "--fsdp2")
    sharded = safetensors.torch.load_file(str(tmp_path / "blora-fsdp2.safetensors"))
    model = peft_model("blora")
    initial = adapter_state(model)
    sgd_steps(model, 2 * BATCH, STEPS)
    single = adapter_state(model)
    assert sharded.keys() == single.keys() and single
    assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=1e-5, msg=key)
