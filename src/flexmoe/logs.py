"""How the library speaks: log records on module loggers under ``flexmoe``, never prints.

Every module logs on ``logging.getLogger(__name__)``, a child of the ``flexmoe`` logger,
which carries only a ``NullHandler``: where records go, and at which level, is the
application's choice (``logging.basicConfig``, or the ``flexmoe`` command's
``--log-level``). A warning that every layer and every call could raise is said once
per process with ``log_once``; the caller decides which rank says it.
"""

from __future__ import annotations

import logging

__all__ = ["LIBRARY_LOGGER", "log_once"]

LIBRARY_LOGGER = "flexmoe"

# The (logger, message) pairs this process has logged through ``log_once``. Process-wide
# on purpose, like the ``warnings`` module's registry: "once per process" is the contract.
_LOGGED: set[tuple[str, str]] = set()


def log_once(logger: logging.Logger, level: int, message: str, *args: object) -> bool:
    """Log ``message % args`` on ``logger`` at ``level`` unless this process already logged it.

    The key is the logger's name and the unformatted ``message``, so the same warning
    with other ``args`` still counts as said. Returns whether the record was emitted.
    """
    key = (logger.name, message)
    if key in _LOGGED:
        return False
    _LOGGED.add(key)
    logger.log(level, message, *args)
    return True
