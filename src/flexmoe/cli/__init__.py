"""The ``flexmoe`` command line."""

from __future__ import annotations

import argparse

from flexmoe.cli.demo import add_demo_arguments, run_demo

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexmoe`` command."""
    parser = argparse.ArgumentParser(
        prog="flexmoe", description="flexmoe: adaptive Mixture-of-Experts for PyTorch"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MoE language model on one process and report")
    add_demo_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    return 0
