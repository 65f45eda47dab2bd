"""benchmarks/studies/gradapprox_vs_loraga.py: GradApprox's and peft's LoRA-GA initializations compared on a tiny Llama."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "studies"))

import gradapprox_vs_loraga as study  # noqa: E402
from gradapprox_init import text_batches  # noqa: E402

R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def compared() -> list[dict]:
    model = tiny_llama(num_key_value_heads=4)
    batches = text_batches(tiny_tokenizer(), n_batches=2, batch_size=4)
    ours = study.gradapprox_init_factors(model, batches, R, ALPHA, layers=[0, 1])
    peft = study.lora_ga_init_factors(model, batches, R, ALPHA, layers=[0, 1])
    assert set(ours) == set(peft)
    return study.compare(ours, peft, model, ALPHA / R)


def test_both_take_the_same_singular_directions(compared):
    # both estimate the top singular vectors approximately (a sketch; peft's svd_lowrank): a few degrees apart at most,
    # where random subspaces of these sizes lie tens of degrees apart
    assert len(compared) == 2 * 7
    assert max(row["A_angle"] for row in compared) < 5.0
    assert max(row["B_angle"] for row in compared) < 5.0
    generator = torch.Generator().manual_seed(0)
    random_angle = study.principal_angles(
        torch.randn(64, R, generator=generator), torch.randn(64, R, generator=generator)
    )
    assert random_angle.median() > 30.0


def test_gradapprox_scales_both_factors_by_the_stable_factor_and_peft_only_b(compared):
    for row in compared:
        d_out = {"gate_proj": 128, "up_proj": 128}.get(row["module"].rsplit(".", 1)[-1], 64)
        stable = d_out**0.25 / math.sqrt(16)
        assert row["A_norm"][0] == pytest.approx(stable * math.sqrt(R), rel=1e-4)  # orthonormal rows, scaled
        assert row["A_norm"][1] == pytest.approx(math.sqrt(R), rel=1e-4)  # orthonormal rows
        assert row["B_norm"][0] == pytest.approx(stable * math.sqrt(R), rel=1e-4)
        assert row["B_norm"][1] < row["B_norm"][0]  # times the gradient's singular values


def test_the_table_has_a_row_per_projection(compared):
    lines = study.table(compared).splitlines()
    assert len(lines) == 2 + 7 and lines[2].startswith("| q_proj |")
    assert torch.isfinite(torch.tensor([row["product_vs_W"] for row in compared])).all()
