"""The ``flexmoe`` command line: ``train``, ``demo``, ``report``, ``plan`` and ``calibrate``.

Every bad input ends in one line on stderr, ``flexmoe <command>: error: ...``, and exit
code 2 (``flexmoe.cli.options.CliError``); ``--help`` of each command lists every option
with its default.
"""

from __future__ import annotations

import argparse
import os
import sys

from flexmoe.cli.calibrate import add_calibrate_arguments, run_calibrate
from flexmoe.cli.options import CliError, OneLineParser
from flexmoe.cli.plan import add_plan_arguments, run_plan
from flexmoe.cli.report import add_report_arguments, run_report
from flexmoe.cli.train import run_train
from flexmoe.cli.train_config import add_train_arguments, train_config_from_args

__all__ = ["build_parser", "main"]


def build_parser() -> OneLineParser:
    """The ``flexmoe`` parser and its sub-commands."""
    parser = OneLineParser(prog="flexmoe", description="flexmoe: adaptive Mixture-of-Experts for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(
        commands.add_parser(
            "train", help="train a small MoE language model on real offline text (1 or N workers)"
        )
    )
    add_train_arguments(commands.add_parser("demo", help="a shorter `flexmoe train` (150 steps)"), steps=150)
    shown = argparse.ArgumentDefaultsHelpFormatter  # `--help` shows every default
    add_report_arguments(
        commands.add_parser(
            "report", help="HTML page and plots of a `flexmoe train` run", formatter_class=shown
        )
    )
    add_plan_arguments(
        commands.add_parser("plan", help="predict and compare MoE plans on a cluster", formatter_class=shown)
    )
    add_calibrate_arguments(
        commands.add_parser(
            "calibrate", help="measure this machine for `flexmoe plan`", formatter_class=shown
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexmoe`` command; a bad input raises ``CliError`` after printing its line."""
    command = "flexmoe"
    try:
        args = build_parser().parse_args(argv)
        command = f"flexmoe {args.command}"
        if args.command in ("train", "demo"):
            run_train(train_config_from_args(args))
        elif args.command == "report":
            run_report(args)
        elif args.command == "plan":
            run_plan(args)
        elif args.command == "calibrate":
            run_calibrate(args)
    except CliError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one worker says it
            print(f"{error.prog or command}: error: {error}", file=sys.stderr, flush=True)
        raise
    return 0
