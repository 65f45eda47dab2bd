"""The ``peft-balanced`` command (``[project.scripts]`` in ``pyproject.toml``): :func:`main` and its subcommands.

* ``peft-balanced demo`` (:mod:`.demo`): Q-BLoRA on the offline SmolLM2-135M on CPU, then merge.
* ``peft-balanced probe`` (:mod:`.probe`): which balance factor λ (or plain LoRA) suits a model, from its data.
* ``peft-balanced sft`` (:mod:`.sft`, its pre-load checks in :mod:`.sft_checks`): TRL-style supervised fine-tuning
  with blora / qablora / gradapprox (``python -m peft_balanced.cli.sft`` under ``accelerate launch``).

The commands import the library (``peft_balanced``) and the demo support (``peft_balanced.demo``); neither imports
this package. Importing it loads no subcommand: each is imported when it runs (``sft`` needs TRL).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["CLIError", "build_parser", "main"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-balanced`` argument parser."""
    from . import demo, probe

    parser = argparse.ArgumentParser(prog="peft-balanced", description="Balanced low-rank adapters for PEFT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.add_parser(sub)
    probe.add_parser(sub)
    # `sft` is parsed by TRL's TrlParser in peft_balanced.cli.sft (main() hands it over); listed here for --help.
    sub.add_parser("sft", add_help=False, help="TRL-style fine-tuning with blora / qablora / gradapprox (sft --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``peft-balanced``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sft"]:
        from .sft import main as sft_main

        return sft_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CLIError as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")
    return 0
