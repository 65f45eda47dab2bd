"""Tables and plots of ``benchmarks/accuracy/accuracy.py`` results.

    python benchmarks/accuracy/accuracy.py report OUT [--reference qlora] [--no-plots]

Reads ``OUT/results.jsonl`` (when a (method, seed, lr) of one setting was run twice, the later line wins), writes
``OUT/report.md`` and, when matplotlib is installed, ``OUT/plots/{accuracy_vs_step,accuracy_vs_wallclock,
train_loss}.png``, and prints per setting (steps, batch, rank, recipe): the learning-rate grid (dev accuracy of every
method at every lr, and the held-out select accuracy that picks the lr), the steps and wall-clock each method needs
to reach LoRA's final dev accuracy, then the accuracy table at each method's selected lr (best against best: mean ±
sample std over seeds, in points; per-task columns with their dev sizes; the paired difference to ``--reference``
with its standard error over dev examples, and per seed).

Learning rates are chosen on the ``select`` rows (train examples held out of training), never on dev: a method's lr
is the one with the highest mean select accuracy of its finished model over the seeds. Records without a select split
fall back to dev, and the table says so (an optimistic choice).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
from collections import defaultdict

from grid import choose_lr, edge_of, load_records, select_score

METHOD_ORDER = (  # benchmarks/accuracy/methods.py METHODS; other names follow in the order first seen
    "base", "lora", "blora2", "qlora", "qblora1", "qblora2", "qblora4", "qblora8", "qablora4x8", "qablora8x8",
    "qblora2_loralr", "qblora4_loralr", "qblora8_loralr", "qablora4x8_loralr", "qablora8x8_loralr", "qblora4_s4",
    "qblora8_s8",
    "lora_ptq_int4", "qlora_ptq_int4", "qlora_ptq_nf4", "qlora_requant",
    "lora_ga", "gradapprox", "gradapprox_d1", "gradapprox_d3", "gradapprox_d5",
)  # fmt: skip


def setting_of(record: dict) -> tuple:
    """What makes results comparable (the lr is chosen within a setting): tasks and their dev sizes, steps, batch
    size, rank, recipe, smoke."""
    s = record["settings"]
    return (tuple(sorted(record["dev_n"].items())), s["steps"], s["batch_size"], s["r"], s.get("recipe", "default"),
            s["smoke"])  # fmt: skip


def diverged_runs(records: list[dict]) -> dict[tuple, set[tuple[str, float]]]:
    """``{setting: {(method, lr)}}`` of the runs whose training loss diverged (records with ``failed``)."""
    out: dict[tuple, set[tuple[str, float]]] = defaultdict(set)
    for record in records:
        if record.get("failed"):
            out[setting_of(record)].add((record["method"], record["settings"]["lr"]))
    return out


def latest(records: list[dict]) -> dict[tuple, dict[str, dict[float, dict[int, dict]]]]:
    """``{setting: {method: {lr: {seed: record}}}}`` keeping the last record of every (setting, method, lr, seed).

    The untrained base model does not depend on the setting: its records join every setting with the same dev sets.
    """
    out: dict[tuple, dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    base = {}
    for record in records:
        if record.get("failed"):
            continue
        if record["adapter"] == "none":
            base.setdefault(setting_of(record)[0], {})[record["seed"]] = record
            continue
        out[setting_of(record)][record["method"]][record["settings"]["lr"]][record["seed"]] = record
    if not out:  # only base records
        for runs in base.values():
            first = next(iter(runs.values()))
            out[setting_of(first)]["base"][first["settings"]["lr"]] = runs
    for setting, methods in out.items():
        if "base" not in methods and setting[0] in base:
            methods["base"] = {0.0: base[setting[0]]}
    rank = {name: i for i, name in enumerate(METHOD_ORDER)}
    return {
        setting: dict(sorted(methods.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        for setting, methods in out.items()
    }


def best_runs(
    methods: dict[str, dict[float, dict[int, dict]]], diverged: set = frozenset()
) -> tuple[dict[str, dict[int, dict]], dict]:
    """Each method's runs at its chosen lr, and ``{method: (lr, how chosen, edge)}``: ``edge`` is ``"top"`` or
    ``"bottom"`` when the choice is the largest or smallest lr tried (diverged ones included), else ``None``."""
    chosen = {}
    for name, by_lr in methods.items():
        bad = {lr for method, lr in diverged if method == name}
        lr, how = choose_lr(by_lr, bad)
        chosen[name] = (lr, how, edge_of(set(by_lr) | bad, lr))
    return {name: methods[name][chosen[name][0]] for name in methods}, chosen


def edge_note(edge: str | None) -> str:
    """What the tables say of a choice at an edge of the grid."""
    return {"top": "top of grid", "bottom": "bottom of grid"}.get(edge, "")


def lr_grid_table(methods: dict[str, dict[float, dict[int, dict]]], chosen: dict, diverged: set = frozenset()) -> str:
    """Dev accuracy (mean ± std over seeds) of every method at every lr, the select accuracy in brackets; the
    chosen lr in bold, and marked when it is at an edge of the method's grid."""
    lrs = sorted(
        {lr for name, by_lr in methods.items() if name != "base" for lr in by_lr} | {lr for _, lr in diverged}
    )
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for name, by_lr in methods.items():
        if name == "base":
            continue
        cells = []
        for lr in lrs:
            runs = by_lr.get(lr)
            if not runs:
                cells.append("diverged" if (name, lr) in diverged else "")
                continue
            score, how = select_score(runs)
            cell = f"{points([r['mean_accuracy'] for r in runs.values()])} [{100 * score:.1f}]"
            note = edge_note(chosen[name][2])
            cells.append((f"**{cell}**" + (f" ({note})" if note else "")) if lr == chosen[name][0] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_transfer_table(chosen: dict, reference: str = "lora") -> str:
    """Each method's chosen lr as a multiple of ``reference``'s (the lr-transfer question: does LoRA's tuned lr carry
    over?); a ratio from a choice at a grid edge is a bound, not a value, and says so."""
    if reference not in chosen:
        return f"(no {reference} runs: no lr-transfer table)"
    ref_lr, _, ref_edge = chosen[reference]
    lines = [f"| method | chosen lr | × {reference}'s ({ref_lr:g}) |", "|---|---|---|"]
    for name, (lr, _, edge) in chosen.items():
        if name in ("base", reference):
            continue
        bound = {"top": " or more", "bottom": " or less"}.get(edge, "")
        note = f" ({reference} at the {ref_edge} of its grid)" if ref_edge else ""
        lines.append(f"| {name} | {lr:g} | {lr / ref_lr:.3g}{bound}{note} |")
    return "\n".join(lines)


def scaling_rule(name: str) -> tuple[str, str] | None:
    """``(method it rescales, rule)`` for a method named after a scaling rule (methods.py): ``*_loralr`` is the
    configs' ``use_lora_lr``, ``*_s<k>`` a factor ``k`` on ``s``; ``None`` for other names."""
    plain, _, suffix = name.rpartition("_")
    if suffix == "loralr":
        return plain, "use_lora_lr"
    if suffix[:1] == "s" and suffix[1:].isdigit():
        return plain, f"s × {suffix[1:]}"
    return None


def lr_rule_table(methods: dict[str, dict[int, dict]], chosen: dict) -> str:
    """Each method trained under a scaling rule (:func:`scaling_rule`), at LoRA's lr, against the same method with the
    paper's scaling at its own chosen lr: does the rule make LoRA's tuned lr right? Paired Δ, rule minus own
    optimum."""
    lines = ["| method | own optimum: lr | accuracy | rule | lr | accuracy | Δ | Δ per seed |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in methods:
        plain, rule = scaling_rule(name) or ("", "")
        if plain not in methods:
            continue
        runs, own = methods[name], methods[plain]
        delta = paired_delta(runs, own)
        edge = edge_note(chosen[plain][2])
        lines.append(
            f"| {plain} | {chosen[plain][0]:g}{f' ({edge})' if edge else ''} | "
            f"{points([r['mean_accuracy'] for r in own.values()])} | {rule} | {chosen[name][0]:g} | "
            f"{points([r['mean_accuracy'] for r in runs.values()])} | "
            f"{'' if delta is None else f'{delta[0]:+.1f} ± {delta[1]:.1f}'} | {per_seed_deltas(runs, own)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def points(values: list[float]) -> str:
    """``"58.7 ± 0.4"`` (accuracies in points; the std only with two or more values)."""
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paired_delta(runs: dict[int, dict], reference: dict[int, dict]) -> tuple[float, float] | None:
    """Difference of mean (macro) dev accuracy to ``reference`` in points, paired by seed and dev example.

    Per task the per-example differences are pooled over the seeds both have; the standard error is
    ``sqrt(Σ_t var_t / n_t) / T`` (examples treated as independent draws). ``None`` without a common seed.
    """
    pairs = [(runs[s], reference[s]) for s in sorted(set(runs) & set(reference))]
    if not pairs:
        return None
    tasks = list(pairs[0][0]["correct"])
    deltas, variances = [], []
    for task in tasks:
        diffs = [
            int(a) - int(b)
            for run, ref in pairs
            for a, b in zip(run["correct"][task], ref["correct"][task], strict=True)
        ]
        deltas.append(statistics.fmean(diffs))
        variances.append(statistics.pvariance(diffs) / len(diffs))
    return 100 * statistics.fmean(deltas), 100 * math.sqrt(sum(variances)) / len(tasks)


def per_seed_deltas(runs: dict[int, dict], reference: dict[int, dict]) -> str:
    """Mean-accuracy differences to ``reference`` seed by seed, in points (``"-0.9, -1.6, +0.9"``)."""
    seeds = sorted(set(runs) & set(reference))
    return ", ".join(f"{100 * (runs[s]['mean_accuracy'] - reference[s]['mean_accuracy']):+.1f}" for s in seeds)


def steps_per_second(records: list[dict]) -> str:
    """Mean training steps per second over ``records`` (with ``, compiled`` when they trained compiled)."""
    rates = [r["settings"]["steps"] / r["train_seconds"] for r in records if r.get("train_seconds")]
    if not rates:
        return ""
    mode = records[0]["settings"].get("compile", "off")
    return f"{statistics.fmean(rates):.2f}" + ("" if mode == "off" else f", compiled ({mode})")


def accuracy_table(methods: dict[str, dict[int, dict]], reference: str, chosen: dict | None = None) -> str:
    """Markdown table: one row per method (in the order first seen) at its chosen lr, then the train-majority
    baseline."""
    chosen = chosen or {}
    first = next(iter(next(iter(methods.values())).values()))
    tasks = list(first["dev_n"])
    head = ["method", "trainable", "seeds", "lr", "mean"] + [f"{t} (n={first['dev_n'][t]})" for t in tasks]
    head += [f"Δ vs {reference}", "Δ per seed", "train s", "steps/s", "peak GiB", "what"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in methods.items():
        recs = [runs[s] for s in sorted(runs)]
        delta = paired_delta(runs, methods[reference]) if reference in methods and name != reference else None
        peaks = [r["peak_gpu_mib"] for r in recs if r.get("peak_gpu_mib")]
        lr, how, edge = chosen.get(name, (recs[0]["settings"]["lr"], "only lr", None))
        notes = [n for n in (edge_note(edge), "" if how in ("only lr", "select split") else how) if n]
        cells = [
            name,
            f"{recs[0]['trainable_params']:,}",
            ",".join(str(r["seed"]) for r in recs),
            "" if name == "base" else f"{lr:g}" + (f" ({', '.join(notes)})" if notes else ""),
            points([r["mean_accuracy"] for r in recs]),
            *(points([r["dev_accuracy"][t] for r in recs]) for t in tasks),
            "" if delta is None else f"{delta[0]:+.1f} ± {delta[1]:.1f}",
            "" if delta is None else per_seed_deltas(runs, methods[reference]),
            f"{statistics.fmean(r['train_seconds'] for r in recs):.1f}",
            steps_per_second(recs),
            f"{max(peaks) / 1024:.2f}" if peaks else "",
            recs[0]["about"]
            + (
                f" (before merging: {points([r['unmerged']['mean_accuracy'] for r in recs])})"
                if recs[0].get("unmerged")
                else ""
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    majority = first["majority_baseline"]
    cells = ["majority", "0", "", "", points([statistics.fmean(majority.values())])]
    cells += [points([majority[t]]) for t in tasks] + [""] * 5 + ["train split's most frequent answer, always"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curve(runs: dict[int, dict]) -> list[tuple[int, float, float]]:
    """``(step, mean training seconds, mean dev accuracy)`` over the seeds, at the steps every seed evaluated."""
    curves = [{c["step"]: c for c in r["eval_curve"]} for r in runs.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [
        (step, statistics.fmean(c[step]["train_seconds"] for c in curves),
         statistics.fmean(c[step]["mean_accuracy"] for c in curves))
        for step in steps
    ]  # fmt: skip


def speed_table(methods: dict[str, dict[int, dict]], reference: str = "lora") -> str:
    """Steps and training wall-clock each method needs to reach ``reference``'s final mean dev accuracy (issue 4).

    Curves are means over seeds of the adapter's dev accuracy during training (for merged methods: before merging).
    """
    if reference not in methods:
        return f"(no {reference} results: no steps-to-accuracy table)"
    ref = list(methods[reference].values())
    target = statistics.fmean(r["mean_accuracy"] for r in ref)
    ref_steps, ref_seconds = ref[0]["settings"]["steps"], statistics.fmean(r["train_seconds"] for r in ref)
    lines = [
        f"To reach {reference}'s final mean dev accuracy {100 * target:.1f} ({ref_steps} steps, {ref_seconds:.1f} s):",
        "| method | first step at or above | × steps | training s then | × wall-clock |",
        "|---|---|---|---|---|",
    ]
    for name, runs in methods.items():
        curve = mean_curve(runs)
        if len(curve) < 2:
            continue
        hit = next(((step, sec) for step, sec, acc in curve if acc >= target), None)
        if hit is None:
            lines.append(f"| {name} | not reached (best {100 * max(a for *_, a in curve):.1f}) | | | |")
        else:
            lines.append(
                f"| {name} | {hit[0]} | {hit[0] / ref_steps:.2f} | {hit[1]:.1f} | {hit[1] / ref_seconds:.2f} |"
            )
    return "\n".join(lines)


def write_plots(methods: dict[str, dict[int, dict]], directory: pathlib.Path, title: str) -> list[str]:
    """Accuracy against steps and against wall-clock, and train-loss curves (means over seeds); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab20").colors
    plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=colors)
    paths = []
    for name, xlabel, index in (("accuracy_vs_step", "step", 0), ("accuracy_vs_wallclock", "training seconds", 1)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, runs in methods.items():
            curve = mean_curve(runs)
            finished = next(iter(runs.values())).get("finish", "none") != "none"
            if len(curve) > 1 and finished:  # the adapter's curve dashed, then the finished model's accuracy
                xs, ys = [c[index] for c in curve], [100 * c[2] for c in curve]
                done = 100 * statistics.fmean(r["mean_accuracy"] for r in runs.values())
                (line,) = ax.plot(xs, ys, linestyle=":", linewidth=1)
                ax.plot([xs[-1], xs[-1]], [ys[-1], done], color=line.get_color(), linewidth=1.5)
                ax.plot([xs[-1]], [done], marker="D", color=line.get_color(), label=f"{method} (finished: {done:.1f})")
            elif len(curve) > 1:
                ax.plot([c[index] for c in curve], [100 * c[2] for c in curve], marker=".", label=method)
            elif curve:  # no training (the base model): a level line
                ax.axhline(100 * curve[0][2], color="grey", linestyle="--", linewidth=1, label=method)
        ax.set(xlabel=xlabel, ylabel="mean dev accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(directory / f"{name}.png", dpi=120)
        plt.close(fig)
        paths.append(str(directory / f"{name}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in methods.items():
        losses = [r["train_loss"] for r in runs.values() if r["train_loss"]]
        if losses:
            mean = [statistics.fmean(v) for v in zip(*losses, strict=True)]
            window = max(1, len(mean) // 20)
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
            ax.plot(range(1, len(smooth) + 1), smooth, label=method)
    ax.set(xlabel="step", ylabel="train loss (moving mean)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "train_loss.png", dpi=120)
    plt.close(fig)
    return [*paths, str(directory / "train_loss.png")]


def main(argv: list[str] | None = None) -> int:
    """Print the report of ``OUT/results.jsonl`` (the accuracy table last) and write report.md and plots."""
    parser = argparse.ArgumentParser(prog="accuracy.py report", description="Tables and plots of accuracy results.")
    parser.add_argument("out", help="the --out directory of benchmarks/accuracy/accuracy.py")
    parser.add_argument("--reference", default="qlora", help="method the paired differences are taken against")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    out = pathlib.Path(args.out)
    sections, tables = [], []
    diverged = diverged_runs(records)
    for index, (setting, by_lr) in enumerate(latest(records).items()):
        _, steps, batch, r, recipe, smoke = setting
        methods, chosen = best_runs(by_lr, diverged.get(setting, set()))
        dev_n = next(iter(next(iter(methods.values())).values()))["dev_n"]
        title = f"{steps} steps x {batch}, r {r}, recipe {recipe}{' (smoke)' if smoke else ''}"
        head = f"## {title}: {', '.join(f'{t} {n}' for t, n in dev_n.items())} dev examples ({sum(dev_n.values())})"
        if not args.no_plots:
            try:
                paths = write_plots(methods, out / "plots" / (f"setting{index}" if index else ""), title)
                print("plots: " + ", ".join(paths))
            except ImportError:
                print("matplotlib is not installed: no plots (pip install matplotlib)")
        grid = lr_grid_table(by_lr, chosen, diverged.get(setting, set()))
        grid_head = (
            "Dev accuracy at every lr [select accuracy, which picks the lr]; bold: the chosen lr (marked when it is "
            "the largest or smallest lr tried: the optimum may lie beyond it)."
        )
        speed = f"{speed_table(methods)}\n\nlr transfer:\n\n{lr_transfer_table(chosen)}"
        rule = lr_rule_table(methods, chosen)
        if rule:
            speed += f"\n\nScaling rules for LoRA's lr against each method's own optimum:\n\n{rule}"
        print(f"\n{head}\n\n{grid_head}\n\n{grid}\n\n{speed}")
        table = accuracy_table(methods, args.reference, chosen)
        sections.append(f"{head}\n\n{table}\n\n{grid_head}\n\n{grid}\n\n{speed}\n")
        tables.append(f"{head}\n\n{table}")
    (out / "report.md").write_text("\n".join(sections), encoding="utf-8")
    print(f"\nwrote {out / 'report.md'}")
    print(
        "\nAccuracy in points: mean ± sample std over seeds; Δ: paired difference of the mean, ± its SE over examples."
    )
    for table in tables:
        print(f"\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
