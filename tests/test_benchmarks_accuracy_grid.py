"""The lr grid of benchmarks/accuracy: choices at an edge are extended outward, marked when they stay there, and
peft's LoRA-GA runs in the same harness as GradApprox's anchor."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import pytest
import torch
from test_benchmarks_accuracy import _bench, _records

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))

import accuracy  # noqa: E402
import grid  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
from parallel import Job  # noqa: E402

SETTINGS = {"batch_size": 16, "r": 16, "lora_alpha": 32.0, "qablora_alpha": 1.0, "warmup_steps": 10, "smoke": False}


def record(method: str, seed: int, lr: float, select: float | None, steps: int = 200) -> dict:
    """A results line: ``select=None`` is a diverged run."""
    settings = {**SETTINGS, "lr": lr, "steps": steps, "recipe": "default"}
    if select is None:
        return {"method": method, "seed": seed, "failed": "loss is nan", "settings": settings}
    return {"method": method, "seed": seed, "mean_accuracy": select, "select": {"mean_accuracy": select},
            "settings": settings}  # fmt: skip


def planned(lrs=(1e-4, 3e-4, 1e-3), seeds=(0, 1), methods=("lora",)) -> list[Job]:
    return [Job(methods, seed, lr, 200) for lr in lrs for seed in seeds]


@pytest.mark.parametrize(
    ("lr", "up", "expected"), [(1e-3, True, 3e-3), (3e-3, True, 1e-2), (3e-4, False, 1e-4), (1e-4, False, 3e-5),
                               (2e-4, True, 6e-4)]
)  # fmt: skip
def test_the_next_lr_outward_is_one_half_decade_step(lr, up, expected):
    assert grid.next_lr(lr, up) == pytest.approx(expected, rel=1e-9)


def test_a_choice_is_at_an_edge_when_it_is_the_largest_or_smallest_lr_tried():
    assert grid.edge_of([1e-4, 3e-4, 1e-3], 1e-3) == "top"
    assert grid.edge_of([1e-4, 3e-4, 1e-3], 1e-4) == "bottom"
    assert grid.edge_of([1e-4, 3e-4, 1e-3], 3e-4) is None
    assert grid.edge_of([1e-3], 1e-3) is None  # one lr is no grid


def test_an_lr_where_one_seed_diverged_is_never_chosen():
    by_lr = {1e-3: {0: record("lora", 0, 1e-3, 0.5)}, 3e-3: {0: record("lora", 0, 3e-3, 0.9)}}
    assert grid.choose_lr(by_lr, diverged={3e-3}) == (1e-3, "only lr")


def test_a_choice_at_the_top_of_the_grid_trains_every_seed_at_the_next_lr_up():
    records = [record("lora", s, lr, acc) for s in (0, 1) for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6))]
    assert grid.extension_jobs(records, planned(), SETTINGS) == [Job(("lora",), 0, 3e-3, 200),
                                                                 Job(("lora",), 1, 3e-3, 200)]  # fmt: skip


def test_a_choice_at_the_bottom_of_the_grid_trains_at_the_next_lr_down():
    records = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.6), (3e-4, 0.5), (1e-3, 0.4))]
    assert grid.extension_jobs(records, planned(seeds=(0,)), SETTINGS) == [Job(("lora",), 0, 3e-5, 200)]


def test_an_interior_choice_or_a_diverged_next_lr_ends_the_extension():
    interior = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.4), (3e-4, 0.6), (1e-3, 0.5))]
    assert grid.extension_jobs(interior, planned(seeds=(0,)), SETTINGS) == []
    bounded = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6), (3e-3, None))]
    assert grid.extension_jobs(bounded, planned(seeds=(0,)), SETTINGS) == []


def test_the_extension_stops_after_its_limit_of_steps_beyond_the_planned_grid():
    rising = [(1e-4, 0.1), (3e-4, 0.2), (1e-3, 0.3), (3e-3, 0.4), (1e-2, 0.5)]
    records = [record("lora", 0, lr, acc) for lr, acc in rising]
    assert grid.extension_jobs(records, planned(seeds=(0,)), SETTINGS, limit=2) == []
    assert grid.extension_jobs(records, planned(seeds=(0,)), SETTINGS, limit=3) == [Job(("lora",), 0, 3e-2, 200)]


def test_a_grid_with_a_planned_run_not_yet_recorded_is_not_judged():
    records = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6))]
    assert grid.extension_jobs(records, planned(seeds=(0, 1)), SETTINGS) == []


def test_a_partial_grid_is_judged_on_the_seeds_that_ran_and_extended_for_every_seed():
    records = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6))]
    records.append(record("lora", 1, 1e-4, 0.9))  # seed 1 has not run at every lr: it does not vote
    jobs = grid.extension_jobs(records, planned(seeds=(0, 1)), SETTINGS, partial=True)
    assert jobs == [Job(("lora",), 0, 3e-3, 200), Job(("lora",), 1, 3e-3, 200)]


def test_a_partial_grid_where_no_seed_has_run_every_lr_is_not_judged():
    records = [record("lora", 0, 1e-4, 0.4), record("lora", 1, 3e-4, 0.5)]
    assert grid.extension_jobs(records, planned(seeds=(0, 1)), SETTINGS, partial=True) == []


def test_runs_of_another_setting_do_not_enter_the_grid():
    records = [record("lora", 0, lr, acc) for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6))]
    records.append({**record("lora", 0, 3e-4, 0.99), "settings": {**records[1]["settings"], "r": 64}})
    assert grid.extension_jobs(records, planned(seeds=(0,)), SETTINGS) == [Job(("lora",), 0, 3e-3, 200)]


def test_the_benchmark_plans_the_extension_from_its_results_file(tmp_path):
    for lr, acc in ((1e-4, 0.4), (3e-4, 0.5), (1e-3, 0.6)):
        harness.append_record(tmp_path, record("lora", 0, lr, acc))
    args = argparse.Namespace(extend_grid=3, lrs_from=None, out=str(tmp_path))
    settings = harness.Settings(batch_size=16, r=16, lora_alpha=32.0)
    assert accuracy.next_round(args, planned(seeds=(0,)), settings, None) == [Job(("lora",), 0, 3e-3, 200)]
    off = argparse.Namespace(extend_grid=0, lrs_from=None, out=str(tmp_path))
    assert accuracy.next_round(off, planned(seeds=(0,)), settings, None) == []


def test_the_report_marks_a_choice_still_at_the_edge_of_its_grid():
    by_lr = {lr: {0: record("lora", 0, lr, acc)} for lr, acc in ((1e-4, 0.4), (1e-3, 0.6))}
    only = {1e-3: by_lr[1e-3]}
    assert report.best_runs({"lora": by_lr})[1]["lora"] == (1e-3, "select split", "top")
    assert report.best_runs({"lora": only})[1]["lora"] == (1e-3, "only lr", None)  # one lr: no grid, no edge
    grid_row = report.lr_grid_table({"lora": by_lr}, report.best_runs({"lora": by_lr})[1]).splitlines()[-1]
    assert grid_row.endswith("(top of grid) |")


def test_lora_ga_initializes_from_the_gradient_and_counts_its_estimate_as_training_time(tmp_path):
    bench = _bench(tmp_path, save=False, estimation_batches=2)
    method = harness.METHODS["lora_ga"]
    model = harness.build_base(method, bench)
    config = harness.adapter_config(method, bench.settings)
    seconds = harness.preprocess_lora_ga(model, config, bench, seed=0)
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert seconds > 0 and b.abs().sum() > 0  # LoRA's B starts at zero; LoRA-GA's from the gradient's subspace
    harness.run_group([method], seed=0, bench=bench, log=lambda line: None)
    (rec,) = _records(bench.out)
    assert rec["method"] == "lora_ga" and 0 < rec["init_seconds"] <= rec["train_seconds"]
    assert torch.isfinite(torch.tensor(rec["train_loss"])).all()


def test_the_limit_counts_from_the_grid_as_asked_for_not_from_earlier_extensions():
    rising = [(1e-4, 0.1), (3e-4, 0.2), (1e-3, 0.3), (3e-3, 0.4), (1e-2, 0.5), (3e-2, 0.6)]
    records = [record("lora", 0, lr, acc) for lr, acc in rising]
    assert grid.extension_jobs(records, planned(seeds=(0,)), SETTINGS, limit=3) == []


def test_the_lr_transfer_table_gives_each_choice_as_a_multiple_of_loras_and_bounds_at_an_edge():
    chosen = {"lora": (1e-3, "select split", None), "qblora2": (3e-3, "select split", None),
              "qablora4x8": (1e-2, "select split", "top"), "base": (0.0, "only lr", None)}  # fmt: skip
    rows = report.lr_transfer_table(chosen).splitlines()[2:]
    assert rows == ["| qblora2 | 0.003 | 3 |", "| qablora4x8 | 0.01 | 10 or more |"]


def test_the_rule_table_sets_each_use_lora_lr_method_against_its_own_optimum_paired_by_seed_and_example():
    def run(seed: int, correct: list[int]) -> dict:
        return {"mean_accuracy": sum(correct) / len(correct), "correct": {"task": correct}}

    methods = {"qblora2": {0: run(0, [1, 1, 0, 0]), 1: run(1, [1, 0, 0, 0])},
               "qblora2_loralr": {0: run(0, [1, 1, 1, 0]), 1: run(1, [1, 1, 0, 0])}}  # fmt: skip
    chosen = {"qblora2": (3e-3, "select split", "top"), "qblora2_loralr": (1e-3, "only lr", None)}
    rows = report.lr_rule_table(methods, chosen).splitlines()[2:]  # SE: sqrt(pvariance([0,0,1,0,0,1,0,0]) / 8)
    assert rows == [
        "| qblora2 | 0.003 (top of grid) | 37.5 ± 17.7 | use_lora_lr | 0.001 | 62.5 ± 17.7 | +25.0 ± 15.3 | +25.0, +25.0 |"
    ]


def test_the_rule_table_names_a_candidate_rule_by_its_suffix():
    run = {"mean_accuracy": 0.5, "correct": {"task": [1, 0]}}
    methods = {"qblora4": {0: run}, "qblora4_s4": {0: run}}
    chosen = {"qblora4": (3e-3, "select split", None), "qblora4_s4": (1e-3, "only lr", None)}
    assert "| qblora4 | 0.003 | 50.0 | s × 4 | 0.001 | 50.0 | +0.0 ± 0.0 | +0.0 |" in report.lr_rule_table(
        methods, chosen
    )


def test_only_loralr_and_s_factor_suffixes_name_a_scaling_rule():
    assert report.scaling_rule("qablora8x8_loralr") == ("qablora8x8", "use_lora_lr")
    assert report.scaling_rule("qblora8_s8") == ("qblora8", "s × 8")
    assert [report.scaling_rule(name) for name in ("qblora8", "gradapprox_d3", "qlora_ptq_nf4")] == [None] * 3


def test_the_rule_table_is_empty_without_use_lora_lr_runs():
    assert report.lr_rule_table({"qblora2": {}}, {"qblora2": (3e-3, "select split", None)}) == ""


def test_a_candidate_rule_multiplies_the_adapters_lora_alpha_and_use_lora_lr_reaches_the_config():
    settings = harness.Settings()
    assert harness.adapter_config(harness.METHODS["qblora4_s4"], settings).lora_alpha == 4 * settings.lora_alpha
    assert harness.adapter_config(harness.METHODS["qblora2_loralr"], settings).use_lora_lr is True
    assert (
        harness.adapter_config(harness.METHODS["qblora8_loralr"], settings).scaling
        == 2 * settings.lora_alpha / settings.r
    )
    assert harness.adapter_config(harness.METHODS["qablora8x8_loralr"], settings).scaling == 8 * settings.qablora_alpha


def test_a_candidate_factor_on_s_reaches_qablora_too():
    settings = harness.Settings()
    candidate = dataclasses.replace(harness.METHODS["qablora4x8"], alpha_factor=3.0)
    assert harness.adapter_config(candidate, settings).lora_alpha == 3.0 * settings.qablora_alpha
