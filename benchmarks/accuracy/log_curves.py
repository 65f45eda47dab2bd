"""Dev-accuracy curves of accuracy.py runs that were stopped before they ended, read back from worker logs.

    python benchmarks/accuracy/log_curves.py OUT/long.log OUT/paper.log [--json docs/results/x.json]

A run cut off by a call's time limit writes no record, but its workers logged every evaluation
(``[wN] [i/n] <job>: estimate`` when a job starts, ``[wN]     step S: dev mean A`` at each evaluation). This
prints, per job (method, lr, steps, recipe), the mean over seeds at the steps every seed reached. These are
mid-training numbers: with a decaying lr the run had not finished its schedule.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import statistics

START = re.compile(r"\[w(\d+)\] \[\d+/\d+\] (\S+) seed (\d+) lr (\S+) steps (\d+) (\S+): estimate")
STEP = re.compile(r"\[w(\d+)\]\s+step\s+(\d+): dev mean ([\d.]+)")


def curves(paths: list[str]) -> dict[tuple, dict[int, dict[int, float]]]:
    """``{(methods, lr, steps, recipe): {seed: {step: accuracy}}}`` from the logs (searched, not matched at line
    starts: progress bars of other workers can share a line)."""
    out: dict[tuple, dict[int, dict[int, float]]] = collections.defaultdict(dict)
    for path in paths:
        running: dict[str, tuple] = {}
        for line in pathlib.Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            for m in START.finditer(line):
                worker, methods, seed, lr, steps, recipe = m.groups()
                running[worker] = ((methods, float(lr), int(steps), recipe), int(seed))
                out[running[worker][0]].setdefault(int(seed), {})
            for m in STEP.finditer(line):
                worker, step, accuracy = m.groups()
                if worker in running:
                    key, seed = running[worker]
                    out[key][seed][int(step)] = float(accuracy)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--json", default=None, help="also write the per-seed curves here")
    args = parser.parse_args(argv)
    table = curves(args.logs)
    print("| job | seeds | last step all seeds reached | mean dev accuracy there | at step 200 | at step 400 |")
    print("|---|---|---|---|---|---|")
    for (methods, lr, steps, recipe), seeds in sorted(table.items()):
        common = sorted(set.intersection(*(set(c) for c in seeds.values())))
        if not common:
            continue
        mean = {s: 100 * statistics.fmean(c[s] for c in seeds.values()) for s in common}
        at = {s: f"{mean[s]:.1f}" if s in mean else "" for s in (200, 400)}
        print(f"| {methods} lr {lr:g}, {steps} steps, {recipe} | {','.join(map(str, sorted(seeds)))} | {common[-1]} | "
              f"{mean[common[-1]]:.1f} | {at[200]} | {at[400]} |")  # fmt: skip
    if args.json:
        path = pathlib.Path(args.json)
        rows = [{"methods": k[0], "lr": k[1], "steps": k[2], "recipe": k[3], "curves": v} for k, v in table.items()]
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
