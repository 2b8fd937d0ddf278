"""The ``flexmoe`` command line: ``train``, ``demo``, ``report``, ``plan``, ``calibrate`` and ``generate``.

Every bad input ends in one line on stderr, ``flexmoe <command>: error: ...``, and exit
code 2 (``flexmoe.cli.options.CliError``); ``--help`` of each command lists every option
with its default. ``--log-level`` (before or after the command) sets how much of the
library's log goes to stderr (``flexmoe.cli.log_setup``).
"""

from __future__ import annotations

import argparse
import os
import sys

from flexmoe.cli.calibrate import add_calibrate_arguments, run_calibrate
from flexmoe.cli.generate import add_generate_arguments, run_generate
from flexmoe.cli.log_setup import LOG_LEVELS, cli_logging
from flexmoe.cli.options import CliError, OneLineParser
from flexmoe.cli.plan import add_plan_arguments, run_plan
from flexmoe.cli.report import add_report_arguments, run_report
from flexmoe.cli.train import run_train
from flexmoe.cli.train_adapters import adapter_options_from_args, add_adapter_arguments, run_finetune
from flexmoe.cli.train_config import add_train_arguments, train_config_from_args

__all__ = ["build_parser", "main"]


def _log_level_option(default: str) -> OneLineParser:
    """``--log-level``, for the top-level parser and (without a default) each command's."""
    options = OneLineParser(add_help=False)
    options.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help="how much of flexmoe's log to write to stderr (other ranks: warnings only) (default: INFO)",
    )
    return options


def build_parser() -> OneLineParser:
    """The ``flexmoe`` parser and its sub-commands."""
    parser = OneLineParser(
        prog="flexmoe",
        description="flexmoe: adaptive Mixture-of-Experts for PyTorch",
        parents=[_log_level_option("INFO")],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # SUPPRESS: a command's own --log-level wins only where it is given.
    common = [_log_level_option(argparse.SUPPRESS)]

    def command(name: str, help: str, show_defaults: bool = True) -> argparse.ArgumentParser:
        # `train` lists its defaults itself (they depend on --config), `generate` in its help texts
        shown = argparse.ArgumentDefaultsHelpFormatter if show_defaults else argparse.HelpFormatter
        return commands.add_parser(name, help=help, parents=common, formatter_class=shown)

    train_help = "train a small MoE language model on real offline text (1 or N workers)"
    train = command("train", train_help, show_defaults=False)
    add_train_arguments(train)
    add_adapter_arguments(train)  # --lora-rank ...: fine-tune adapters instead (train_adapters)
    demo_help = "a shorter `flexmoe train` (150 steps)"
    add_train_arguments(command("demo", demo_help, show_defaults=False), steps=150)
    add_report_arguments(command("report", "HTML page and plots of a `flexmoe train` run"))
    add_plan_arguments(command("plan", "predict and compare MoE plans on a cluster"))
    add_calibrate_arguments(command("calibrate", "measure this machine for `flexmoe plan`"))
    generate_help = "generate text with a transformers MoE model, its experts on disk with --expert-budget"
    add_generate_arguments(command("generate", generate_help, show_defaults=False))
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command in ("train", "demo"):
        config = train_config_from_args(args)
        adapters = adapter_options_from_args(args) if args.command == "train" else None
        if adapters is None:
            run_train(config)
        else:
            run_finetune(config, adapters)
    elif args.command == "report":
        run_report(args)
    elif args.command == "plan":
        run_plan(args)
    elif args.command == "calibrate":
        run_calibrate(args)
    elif args.command == "generate":
        run_generate(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexmoe`` command; a bad input raises ``CliError`` after printing its line."""
    command = "flexmoe"
    try:
        args = build_parser().parse_args(argv)
        command = f"flexmoe {args.command}"
        # Under torchrun (its RANK and WORLD_SIZE), each worker runs this same main().
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        with cli_logging(args.log_level, rank, world_size):
            _run(args)
    except CliError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one worker says it
            print(f"{error.prog or command}: error: {error}", file=sys.stderr, flush=True)
        raise
    return 0
