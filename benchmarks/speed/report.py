"""The markdown table and the ratio lines that ``speed.py`` prints last (and writes to speed.log)."""

from __future__ import annotations


def markdown_table(rows: list[dict], extras: list[dict], args) -> list[str]:
    lines = [
        f"Training, batch {args.batch}x{args.seq}, r={args.r} (BLoRA balance {args.balance}, QA-BLoRA tile "
        f"{args.tile[0]}x{args.tile[1]}), adapters {args.adapter_dtype}, {args.layers} layers:",
        "",
        "| method | base | compile | grad ckpt | trainable | s/step | tok/s | peak GiB | GPU kernel s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['base']} | {row['compile']} | {'on' if row['gc'] else 'off'} "
            f"| {row['trainable'] / 1e6:.2f}M "
            f"| {row['step_s']:.3f} | {row['tok_s']:.0f} | {row['peak_gib']:.1f} | "
            + (f"{row['gpu_kernel_s']:.3f} |" if row["gpu_kernel_s"] is not None else "- |")
        )
    lines += ratio_lines(rows)
    inference = [e for e in extras if e.get("what") == "inference"]
    if inference:
        lines += ["", "| model | weights GiB | prefill tok/s | decode tok/s (batch 1) |", "|---|---:|---:|---:|"]
        for e in inference:
            lines.append(
                f"| {e['base']} | {e['weights_gib']:.1f} | {e['prefill_tok_s']:.0f} | {e['decode_tok_s']:.1f} |"
            )
    for e in extras:
        if e.get("what") == "gradapprox_estimation":
            lines.append(
                f"\nGradApprox estimation on NF4 ({e['batches']} batches x 2 passes): {e['seconds']:.1f} s, "
                f"peak {e['peak_gib']:.1f} GiB"
            )
        if e.get("what") == "adapter_activation":
            lines.append(f"Adapter autograd memory, one {args.hidden}->{args.inter} layer, {args.batch * args.seq} "
                         f"tokens, {e['method']}: {e['bytes'] / 2**20:.1f} MiB")  # fmt: skip
    return lines


RATIOS = (("qblora", "qlora", "Q-BLoRA / QLoRA"), ("qablora", "qlora_match", "QA-BLoRA / QLoRA (equal params)"),
          ("blora", "lora", "BLoRA / LoRA"))  # fmt: skip


def ratio_lines(rows: list[dict]) -> list[str]:
    """tok/s ratios of ours over peft's, at each compile setting, against peft's at the same setting and eager."""
    lines = []
    settings = list(dict.fromkeys(r["compile"] for r in rows))
    for gc_on in (True, False):
        by = {(r["method"], r["compile"]): r for r in rows if r["gc"] == gc_on}
        for ours, theirs, label in RATIOS:
            for setting in settings:
                for reference in dict.fromkeys((setting, "off")):
                    if (ours, setting) in by and (theirs, reference) in by:
                        ratio = by[ours, setting]["tok_s"] / by[theirs, reference]["tok_s"]
                        line = (
                            f"{label} tok/s, grad ckpt {'on' if gc_on else 'off'}, ours compile {setting} vs "
                            f"theirs compile {reference}: {ratio:.2f}x"
                        )
                        if by[theirs, reference]["peak_gib"] > 0:  # measured on CUDA only
                            memory = by[ours, setting]["peak_gib"] / by[theirs, reference]["peak_gib"]
                            line += f" (peak memory {memory:.2f}x)"
                        lines.append(line)
    return [""] + lines if lines else []
