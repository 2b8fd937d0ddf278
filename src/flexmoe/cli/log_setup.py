"""Where the ``flexmoe`` command sends the library's log records: stderr, one line each.

The library only logs (``flexmoe.logs``); the command is the application, so it picks
the level (``--log-level``, default ``INFO``) and the format. Under ``torchrun`` only
rank 0 logs below ``WARNING``, so a run's progress is said once, not once per worker;
every rank's warnings and errors still come through, tagged with the rank.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from flexmoe.logs import LIBRARY_LOGGER

__all__ = ["LOG_LEVELS", "cli_logging", "level_for_rank"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A handler on whatever ``sys.stderr`` is when a record comes (tests and tools swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


def level_for_rank(level: str, rank: int) -> int:
    """The numeric level for ``rank``: ``level`` on rank 0, at least ``WARNING`` elsewhere."""
    number = logging.getLevelNamesMapping()[level]
    return number if rank == 0 else max(number, logging.WARNING)


@contextmanager
def cli_logging(level: str, rank: int, world_size: int) -> Iterator[None]:
    """Log the ``flexmoe`` records at ``level`` to stderr while the block runs; restore after.

    Restoring matters when ``flexmoe.cli.main`` runs inside another program (tests, a
    notebook): the command's handler and level do not outlive the command.
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    handler = _StderrHandler()
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    logger.setLevel(level_for_rank(level, rank))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
