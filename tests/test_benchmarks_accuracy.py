"""The harness of benchmarks/accuracy.py on a tiny Llama and toy BIG-bench files (nothing is downloaded)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
from tiny import tiny_llama, tiny_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402
import accuracy_harness as harness  # noqa: E402
import accuracy_report  # noqa: E402

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
    accuracy_report.main([str(two_seed_results)])
    for name in ("accuracy_vs_step", "accuracy_vs_wallclock", "train_loss"):
        assert (two_seed_results / "plots" / f"{name}.png").stat().st_size > 1000
