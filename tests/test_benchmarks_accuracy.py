"""The harness of benchmarks/accuracy/accuracy.py on a tiny Llama and toy BIG-bench files (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

import peft_balanced

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"))

import accuracy  # noqa: E402
import estimate  # noqa: E402
import harness  # noqa: E402
import parallel  # noqa: E402
import report  # noqa: E402

TASKS = {
    "parity": lambda i: {"input": f"is {i} odd?", "choices": ["yes", "no"], "answer": 1 - i % 2},
    "pick": lambda i: {"input": f"{'abc'[i % 3]}?", "choices": ["a", "b", "c"], "answer": i % 3},
}


def _write_tasks(root: pathlib.Path) -> pathlib.Path:
    for task, make in TASKS.items():
        (root / task).mkdir(parents=True)
        for split, ids in (("train", range(12)), ("dev", range(100, 105))):
            rows = [{"task": task, "id": i, "input_prefix": "Q: ", "output_prefix": " A: ", **make(i)} for i in ids]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _bench(tmp_path: pathlib.Path, **overrides) -> harness.Bench:
    train, dev = harness.load_tasks(_write_tasks(tmp_path / "bigbench"), list(TASKS))
    tokenizer = tiny_tokenizer()
    settings = harness.Settings(
        **{"steps": 3, "batch_size": 2, "eval_every": 2, "eval_batch_size": 4, "r": 4, "lora_alpha": 8, **overrides}
    )
    harness.tokenize_train(train, tokenizer, settings.max_length)
    # 4 key/value heads: every projection has sizes that are multiples of 64 (bitsandbytes NF4 on CPU)
    model = tiny_llama(vocab_size=len(tokenizer), num_key_value_heads=4)
    return harness.Bench(model, tokenizer, train, dev, settings, tmp_path / "out")


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_run_appends_a_record_with_accuracies_curves_and_the_saved_adapter(tmp_path):
    bench = _bench(tmp_path)
    harness.run_group([harness.METHODS["lora"]], seed=0, bench=bench, log=lambda line: None)
    (record,) = _records(bench.out)
    r, dims = 4, [(64, 64), (64, 64), (64, 64), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down
    assert record["method"] == "lora" and record["seed"] == 0
    assert record["trainable_params"] == 2 * sum(r * (d_in + d_out) for d_in, d_out in dims)
    assert record["dev_n"] == {"parity": 5, "pick": 5}
    assert [len(record["correct"][t]) for t in TASKS] == [5, 5]
    assert record["dev_accuracy"] == {t: record["correct"][t].count("1") / 5 for t in TASKS}
    assert record["mean_accuracy"] == pytest.approx(sum(record["dev_accuracy"].values()) / 2)
    assert len(record["train_loss"]) == 3
    assert [point["step"] for point in record["eval_curve"]] == [0, 2, 3]
    assert record["eval_curve"][-1]["dev_accuracy"] == record["dev_accuracy"]
    assert record["train_seconds"] >= record["eval_curve"][1]["train_seconds"] > 0
    assert (pathlib.Path(record["saved"][0]) / "adapter_config.json").is_file()


def test_evaluating_at_the_end_only_scores_the_dev_set_once(tmp_path):
    bench = _bench(tmp_path, eval_every=0, save=False)
    harness.run_group([harness.METHODS["lora"]], seed=0, bench=bench, log=lambda line: None)
    (record,) = _records(bench.out)
    assert [point["step"] for point in record["eval_curve"]] == [3]
    assert record["eval_curve"][0]["dev_accuracy"] == record["dev_accuracy"]


def test_qlora_and_its_requantized_merge_share_one_training_run(tmp_path):
    bench = _bench(tmp_path, save=False)
    methods = [harness.METHODS["qlora_requant"], harness.METHODS["qlora"]]
    harness.run_group(methods, seed=1, bench=bench, log=lambda line: None)
    qlora, requant = _records(bench.out)
    assert (qlora["method"], requant["method"]) == ("qlora", "qlora_requant")
    assert requant["train_loss"] == qlora["train_loss"]
    assert requant["unmerged"]["correct"] == qlora["correct"]
    assert qlora["saved"] == requant["saved"] == []


def test_gradapprox_with_the_approximator_records_its_out_of_sample_cosines(tmp_path):
    bench = _bench(tmp_path, save=False, steps=6, estimation_batches=1, refresh_every=2)
    harness.run_group([harness.METHODS["gradapprox_d1"]], seed=0, bench=bench, log=lambda line: None)
    (record,) = _records(bench.out)
    assert record["method"] == "gradapprox_d1" and len(record["train_loss"]) == 6
    fits = record["approximator"]  # exact steps: 0..3 (warm-up), 4; approximated: 5
    assert [entry["exact_batch"] for entry in fits] == [1, 2, 3, 4, 5]
    assert all(-1 <= entry["grad_cosine"] <= 1 for entry in fits[1:])


def test_unknown_method_is_refused_naming_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main(["--methods", "lora,qlora8", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "unknown method 'qlora8'" in err and "qblora8" in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.fixture
def two_seed_results(tmp_path) -> pathlib.Path:
    bench = _bench(tmp_path, save=False)
    for seed in (0, 1):
        for name in ("base", "qlora", "lora"):
            harness.run_group([harness.METHODS[name]], seed=seed, bench=bench, log=lambda line: None)
    return bench.out


def test_report_prints_the_accuracy_table_last(two_seed_results, capsys):
    assert accuracy.main(["report", str(two_seed_results), "--no-plots"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("| method | trainable |"))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[header + 2 :]}
    assert "parity (n=5)" in lines[header] and "pick (n=5)" in lines[header]
    assert list(rows) == ["base", "lora", "qlora", "majority"]  # the benchmark's order, not the run order
    assert " | 0,1 | " in rows["lora"] and " ± " in rows["lora"]
    assert lines[-1] == rows["majority"]
    assert (two_seed_results / "report.md").read_text().count("| method | trainable |") == 1


def test_report_writes_accuracy_and_loss_plots(two_seed_results, capsys):
    pytest.importorskip("matplotlib")
    report.main([str(two_seed_results)])
    for name in ("accuracy_vs_step", "accuracy_vs_wallclock", "train_loss"):
        assert (two_seed_results / "plots" / f"{name}.png").stat().st_size > 1000


def test_select_rows_are_held_out_of_training_and_drawn_the_same_way_every_time(tmp_path):
    train, _ = harness.load_tasks(_write_tasks(tmp_path / "bigbench"), list(TASKS))
    kept, select = harness.split_select(train, 3)
    again_kept, again = harness.split_select(train, 3)
    assert {t: len(rows) for t, rows in select.items()} == {"parity": 3, "pick": 3}
    assert len(kept) == len(train) - 6
    held = {(r["task"], r["id"]) for rows in select.values() for r in rows}
    assert held.isdisjoint((r["task"], r["id"]) for r in kept)
    assert again == select and again_kept == kept


def test_holding_out_all_train_rows_of_a_task_is_refused(tmp_path):
    train, _ = harness.load_tasks(_write_tasks(tmp_path / "bigbench"), list(TASKS))
    with pytest.raises(ValueError, match="cannot hold 12 of 12 parity train rows out"):
        harness.split_select(train, 12)


def test_ptq_finish_adds_the_qlora_update_to_the_original_weights_not_the_nf4_dequantized_ones(tmp_path):
    import finish
    from peft import get_peft_model

    bench = _bench(tmp_path, save=False)
    method = harness.METHODS["qlora_ptq_int4"]
    peft_model = get_peft_model(harness.build_base(method, bench), harness.adapter_config(method, bench.settings))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a non-zero update
    merged = finish.merge_into_original(peft_model, bench.model, "cpu", torch.float32)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    original = bench.model.model.layers[0].self_attn.q_proj.weight
    expected = original + layer.get_delta_weight("default")
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=1e-6)
    int4 = finish.finish(method, peft_model, bench, None)
    assert isinstance(int4.model.layers[0].self_attn.q_proj, peft_balanced.TileInt4Linear)
    assert int4.model.layers[0].self_attn.q_proj.tile == (4, 8)


def test_report_picks_each_methods_lr_on_the_select_split_and_compares_best_with_best(tmp_path, capsys):
    bench = _bench(tmp_path, save=False)
    train, select = harness.split_select(bench.train_rows, 4)
    bench = dataclasses.replace(bench, train_rows=train, select=select)
    for lr in (1e-4, 3e-2):
        for name in ("qlora", "lora"):
            settings = dataclasses.replace(bench.settings, lr=lr)
            harness.run_group([harness.METHODS[name]], 0, dataclasses.replace(bench, settings=settings), lambda _: 0)
    records = report.load_records(bench.out)
    by_lr = report.latest(records)
    (methods,) = by_lr.values()
    for name in ("lora", "qlora"):
        scores = {lr: runs[0]["select"]["mean_accuracy"] for lr, runs in methods[name].items()}
        best = max(scores, key=lambda lr: (scores[lr], -lr))
        assert report.choose_lr(methods[name]) == (best, "select split")
    assert accuracy.main(["report", str(bench.out), "--no-plots"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("| method | trainable |"))
    lora_row = next(line for line in lines[header:] if line.startswith("| lora |"))
    lr = report.choose_lr(methods["lora"])[0]
    edge = "top" if lr == max(methods["lora"]) else "bottom"  # two lrs: the choice is at an edge, and says so
    assert f" | {lr:g} ({edge} of grid) | " in lora_row
    assert any(line.startswith("| method | lr 0.0001 | lr 0.03 |") for line in lines)  # the whole grid is shown


def test_paper_recipe_trains_rank_64_with_alpha_16_a_constant_lr_and_clipping_0_3():
    job = parallel.Job(("qblora2",), 0, 2e-4, 10, "paper")
    settings = dataclasses.replace(harness.Settings(), lr=job.lr, steps=job.steps, **harness.RECIPES[job.recipe])
    assert (settings.r, settings.lora_alpha, settings.grad_clip, settings.schedule) == (64, 16.0, 0.3, "constant")
    assert [harness.lr_factor(step, 10, 2, settings.schedule) for step in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert harness.lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)


def _claim_all(plan: str, worker: int, n: int, queue) -> None:
    queue.put([i for i in range(n) if parallel.claim(pathlib.Path(plan), i, worker)])


def test_every_planned_job_is_claimed_by_exactly_one_of_several_racing_workers(tmp_path):
    import multiprocessing

    jobs = [parallel.Job(("lora",), seed, lr, 5) for seed in range(10) for lr in (1e-4, 1e-3, 3e-3)]
    plan = parallel.write_plan(tmp_path, jobs)
    assert parallel.read_plan(plan) == jobs
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(str(plan), w, len(jobs), queue)) for w in range(4)]
    for w in workers:
        w.start()
    claimed = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sorted(i for part in claimed for i in part) == list(range(len(jobs)))
    assert parallel.unclaimed(plan, jobs) == []


def test_lr_grid_plans_every_lr_and_seed_and_the_base_model_once_per_seed():
    args = accuracy.build_parser().parse_args(["--methods", "base,qlora,qlora_requant", "--seeds", "0,1",
                                               "--lrs", "1e-4,1e-3", "--steps", "200,600"])  # fmt: skip
    jobs = accuracy.plan_jobs(harness.resolve_methods(args.methods.split(",")), args, args.steps)
    assert sum(job.methods == ("base",) for job in jobs) == 2
    trained = [(j.seed, j.lr, j.steps) for j in jobs if j.methods == ("qlora", "qlora_requant")]
    assert sorted(trained) == sorted((s, lr, n) for s in (0, 1) for lr in (1e-4, 1e-3) for n in (200, 600))


def test_a_diverged_lr_is_shown_in_the_grid_and_never_chosen(tmp_path, capsys):
    bench = _bench(tmp_path, save=False)
    harness.run_group([harness.METHODS["lora"]], 0, bench, lambda _: 0)
    job = parallel.Job(("lora",), 0, 3e-2, bench.settings.steps)
    settings = dataclasses.replace(bench.settings, lr=job.lr)
    failed = harness.failure_record(harness.METHODS["lora"], job, dataclasses.replace(bench, settings=settings), "x")
    harness.append_record(bench.out, failed)
    records = report.load_records(bench.out)
    (methods,) = report.latest(records).values()
    assert list(methods["lora"]) == [bench.settings.lr]  # the diverged run is no candidate
    assert accuracy.main(["report", str(bench.out), "--no-plots"]) == 0
    grid_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| lora | ") and
                    "diverged" in line)  # fmt: skip
    assert grid_row.count("|") == 4  # method, lr 3e-4 (chosen), lr 0.03 (diverged)


def test_lrs_from_chooses_on_the_lr_grid_and_ignores_later_runs_at_other_step_counts(tmp_path):
    def record(lr: float, steps: int, select: float) -> dict:
        return {"method": "qlora", "seed": 0, "adapter": "lora", "mean_accuracy": select, "select": {
            "mean_accuracy": select}, "settings": {"lr": lr, "steps": steps, "recipe": "default"}}  # fmt: skip

    for rec in (record(1e-4, 200, 0.40), record(1e-3, 200, 0.55), record(1e-4, 600, 0.90)):
        harness.append_record(tmp_path, rec)
    assert accuracy.chosen_lrs(tmp_path) == {"qlora": 1e-3}
    assert accuracy.chosen_lrs(tmp_path / "results.jsonl") == {"qlora": 1e-3}


def test_resume_knows_every_recorded_method_seed_lr_steps_and_recipe(tmp_path):
    assert accuracy.done_jobs(tmp_path) == set()
    harness.append_record(tmp_path, {"method": "lora", "seed": 2, "settings": {"lr": 3e-4, "steps": 600}})
    assert accuracy.done_jobs(tmp_path) == {("lora", 2, 3e-4, 600, "default")}


@pytest.mark.slow
def test_a_compiled_run_trains_through_compiled_decoder_layers_and_the_report_gives_its_steps_per_second(tmp_path):
    import torch._dynamo

    bench = _bench(tmp_path, compile="default", save=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    harness.run_group([harness.METHODS["qblora2"]], seed=0, bench=bench, log=lambda line: None)
    (record,) = _records(bench.out)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"]
    assert record["settings"]["compile"] == "default"
    assert report.steps_per_second([record]) == f"{3 / record['train_seconds']:.2f}, compiled (default)"


def test_the_accuracy_table_gives_each_method_its_steps_per_second_and_whether_it_trained_compiled():
    def record(seconds, mode):
        return {"settings": {"steps": 600, "compile": mode}, "train_seconds": seconds}

    assert report.steps_per_second([record(300.0, "off"), record(200.0, "off")]) == "2.50"
    assert report.steps_per_second([record(150.0, "default")]) == "4.00, compiled (default)"
    assert report.steps_per_second([{"settings": {"steps": 600}, "train_seconds": 0}]) == ""


def test_a_failed_workers_exit_code_and_the_end_of_its_log_are_reported(tmp_path):
    log = tmp_path / "worker-3.log"
    log.write_text("[w3] [1/4] lora seed 0\n" + "".join(f"line {i}\n" for i in range(30)) + "RuntimeError: boom\n")
    lines = parallel.failure_report(log, 3, 1, lines=5)
    assert lines[0] == "[w3] exited with code 1; the end of worker-3.log:"
    assert lines[1:] == [f"[w3] | line {i}" for i in range(26, 30)] + ["[w3] | RuntimeError: boom"]


def test_mps_counts_as_running_when_its_pipe_directory_has_a_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not parallel.mps_running()
    (tmp_path / "control").touch()
    assert parallel.mps_running()


def test_mps_that_cannot_start_says_why_and_leaves_the_workers_time_slicing(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "pipes"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control here
    lines = []
    with parallel.mps_daemon(lines.append) as up:
        assert up is False
    assert lines == ["CUDA MPS: nvidia-cuda-mps-control is not on PATH; the workers will time-slice the GPU"]


def test_mps_already_running_is_used_and_left_running(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    (tmp_path / "control").touch()
    with parallel.mps_daemon(print) as up:
        assert up is True
    assert (tmp_path / "control").exists()


def test_a_base_not_yet_measured_is_estimated_as_much_slower_as_the_measured_one_ran(tmp_path):
    bench = _bench(tmp_path)
    bench.rates = dict(estimate.DEFAULT_RATES["cpu"])
    assumed_nf4 = estimate.step_seconds(bench.rates, "nf4", 100.0)
    steps, tokens = 4, 400
    per_step = 3 * estimate.step_seconds(bench.rates, "dense", tokens / steps)  # three times slower than assumed
    record = {
        "base": "dense",
        "train_seconds": per_step * steps,
        "init_seconds": 0.0,
        "train_loss": [1.0] * steps,
        "padded_tokens": tokens,
        "eval_seconds": 0.0,
        "eval_curve": [],
        "finish": "none",
        "setup_seconds": 0.0,
    }
    estimate.calibrate(bench, record)
    assert estimate.step_seconds(bench.rates, "dense", 100.0) == pytest.approx(per_step)  # measured
    assert estimate.step_seconds(bench.rates, "nf4", 100.0) == pytest.approx(3 * assumed_nf4)
