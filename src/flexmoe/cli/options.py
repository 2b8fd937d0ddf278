"""Command-line plumbing shared by the ``flexmoe`` commands: one-line errors and checked values.

Every bad input ends in one line, ``flexmoe <command>: error: <what and where>``, and
exit code 2 (argparse's convention), never a traceback. ``CliError`` carries that line;
``OneLineParser`` turns argparse's own errors into it; the ``check_*`` functions are
the range and type checks the configuration dataclasses run in ``__post_init__``, and
``int_in`` / ``float_in`` are the same checks as argparse ``type=`` converters.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "CliError",
    "OneLineParser",
    "OptionError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_optional_path",
    "describe_default",
    "float_in",
    "int_in",
    "one_line",
    "option_flag",
]


class CliError(SystemExit):
    """A failure the user can fix, said in one line: ``str(error)`` is the line, ``code`` the exit status.

    A ``SystemExit``, so that code calling ``flexmoe.cli.main`` directly (tests, scripts)
    sees the usual exit; ``main`` prints ``<prog>: error: <line>`` before it propagates.
    """

    def __init__(self, message: str, *, code: int = 2, prog: str | None = None) -> None:
        super().__init__(code)
        self.message = message
        self.prog = prog

    def __str__(self) -> str:
        return self.message


class OptionError(ValueError):
    """A configuration value that fails its check; ``option`` is the field it belongs to.

    ``str(error)`` reads ``"<option> must be ..., got <value>"`` (the dataclass field's
    name); ``reason`` is the part after the name, for messages that name the option the
    way the user wrote it (``--batch-size``, or a key of a ``--config`` file).
    """

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option = option
        self.reason = reason


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one ``CliError`` line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage: the caller prints one line."""
        raise CliError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


def option_flag(field: str) -> str:
    """The command-line spelling of a configuration field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum:g}, {maximum:g}]"
    if minimum is not None:
        return f">= {minimum:g}"
    if maximum is not None:
        return f"<= {maximum:g}"
    return ""


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) within the bounds, else ``OptionError``."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        expected = f"an integer {_bounds(minimum, maximum)}".rstrip()
        raise OptionError(name, f"must be {expected}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite ``float`` (an ``int`` is accepted) within the bounds, else ``OptionError``."""
    expected = "a finite number " + ("> 0" if positive else _bounds(minimum, maximum))
    if not (_is_int(value) or isinstance(value, float)):
        raise OptionError(name, f"must be {expected.rstrip()}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if (
        not math.isfinite(number)
        or (positive and number <= 0)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        raise OptionError(name, f"must be {expected.rstrip()}, got {value!r}")
    return number


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else ``OptionError`` listing them."""
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise OptionError(name, f"must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, not ``"yes"``), else ``OptionError``."""
    if not isinstance(value, bool):
        raise OptionError(name, f"must be true or false, got {value!r}")
    return value


def check_optional_path(name: str, value: object) -> Path | None:
    """``None``, or ``value`` (a non-empty ``str`` or ``Path``) as a ``Path``, else ``OptionError``."""
    if value is None:
        return None
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise OptionError(name, f"must be a path (a non-empty string), got {value!r}")


def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: the text as an ``int`` within the bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(minimum, maximum)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(minimum: float | None = None, *, positive: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: the text as a finite ``float`` (``> 0`` with ``positive``)."""
    expected = "a finite number " + ("> 0" if positive else _bounds(minimum, None))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"expected {expected.rstrip()}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def describe_default(value: Any) -> str:
    """A default as ``--help`` shows it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (library messages can span several), cut at ``limit``."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
