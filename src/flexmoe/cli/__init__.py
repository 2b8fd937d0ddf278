"""The ``flexmoe`` command line."""

from __future__ import annotations

import argparse

from flexmoe.cli.calibrate import add_calibrate_arguments, run_calibrate
from flexmoe.cli.plan import add_plan_arguments, run_plan
from flexmoe.cli.report import add_report_arguments, run_report
from flexmoe.cli.train import add_train_arguments, config_file_defaults, run_train

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexmoe`` command."""
    parser = argparse.ArgumentParser(
        prog="flexmoe", description="flexmoe: adaptive Mixture-of-Experts for PyTorch"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    trainers = {
        "train": commands.add_parser(
            "train", help="train a small MoE language model on real offline text (1 or N workers)"
        ),
        "demo": commands.add_parser("demo", help="a shorter `flexmoe train` (150 steps)"),
    }
    add_train_arguments(trainers["train"])
    add_train_arguments(trainers["demo"], steps=150)
    report = commands.add_parser("report", help="HTML page and plots of a `flexmoe train` run")
    add_report_arguments(report)
    add_plan_arguments(commands.add_parser("plan", help="predict and compare MoE plans on a cluster"))
    add_calibrate_arguments(commands.add_parser("calibrate", help="measure this machine for `flexmoe plan`"))
    args = parser.parse_args(argv)
    if args.command in trainers:
        defaults = config_file_defaults(trainers[args.command], args.config)
        if defaults:  # the file's values become defaults; the command line still wins
            trainers[args.command].set_defaults(**defaults)
            args = parser.parse_args(argv)
        run_train(args)
    elif args.command == "report":
        run_report(args)
    elif args.command == "plan":
        run_plan(args)
    elif args.command == "calibrate":
        run_calibrate(args)
    return 0
