"""The library logs and never prints; a warning is said once per process, by one rank.

The source audit reads every library module (the command line, ``flexmoe.cli``, may
write to the console). The "no calibration" warning of a distributed layer's cost
model is the case that used to be a ``warnings.warn`` on every rank: here it is a log
record, once per process however many layers and calls hit it, and on a 2-process gloo
group only rank 0 logs it.
"""

from __future__ import annotations

import ast
import logging
import warnings
from pathlib import Path

import pytest
import torch

import flexmoe.logs
from flexmoe import MoELayer
from flexmoe.cli.log_setup import cli_logging, level_for_rank
from flexmoe.layer.cost import resolve_cluster
from flexmoe.logs import LIBRARY_LOGGER, log_once

from .distributed import run_distributed

SRC = Path(__file__).resolve().parents[1] / "src" / "flexmoe"
NO_CALIBRATION = "no calibration of this machine"


@pytest.fixture
def uncalibrated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No calibration file (an empty cache directory) and nothing logged yet in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(flexmoe.logs, "_LOGGED", set())


def _console_writes(tree: ast.Module) -> list[str]:
    """``print(...)``, ``sys.stdout`` / ``sys.stderr`` and ``warnings.warn`` in ``tree``."""
    banned = {("sys", "stdout"), ("sys", "stderr"), ("warnings", "warn")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"line {node.lineno}: print")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in banned
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_library_never_writes_to_the_console():
    writes = [
        f"{path.relative_to(SRC)} {where}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] != "cli"
        for where in _console_writes(ast.parse(path.read_text()))
    ]
    assert not writes, "log instead (logging.getLogger(__name__)):\n" + "\n".join(writes)


def test_loggers_are_named_by_module():
    named = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger":
                name = node.args[0] if node.args else None
                if not (isinstance(name, ast.Name) and name.id in {"__name__", "LIBRARY_LOGGER"}):
                    named.append(f"{path.relative_to(SRC)} line {node.lineno}")
    assert not named, "use logging.getLogger(__name__):\n" + "\n".join(named)


def test_the_library_logger_has_only_a_null_handler():
    handlers = logging.getLogger(LIBRARY_LOGGER).handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


def test_log_once_keys_by_logger_and_message(monkeypatch, caplog):
    monkeypatch.setattr(flexmoe.logs, "_LOGGED", set())
    first, second = logging.getLogger("flexmoe.test.first"), logging.getLogger("flexmoe.test.second")
    with caplog.at_level(logging.INFO, logger=LIBRARY_LOGGER):
        assert log_once(first, logging.INFO, "seen %d", 1)
        assert not log_once(first, logging.INFO, "seen %d", 2)  # other arguments: the same message
        assert log_once(second, logging.INFO, "seen %d", 3)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("flexmoe.test.first", "seen 1"),
        ("flexmoe.test.second", "seen 3"),
    ]


def test_no_calibration_is_one_log_record_per_process(uncalibrated, caplog, capsys):
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warnings.warn would fail here
        for _ in range(3):
            resolve_cluster(None, cpu)
    records = [r for r in caplog.records if NO_CALIBRATION in r.getMessage()]
    assert [(r.name, r.levelno) for r in records] == [("flexmoe.layer.cost", logging.WARNING)]
    assert capsys.readouterr() == ("", "")


def test_a_quiet_rank_does_not_use_up_the_warning(uncalibrated, caplog):
    cpu = torch.device("cpu")
    resolve_cluster(None, cpu, warn=False)
    assert not caplog.records
    resolve_cluster(None, cpu)
    assert [r.getMessage() for r in caplog.records if NO_CALIBRATION in r.getMessage()]


def _no_calibration_records(rank: int, world: int, layers: int) -> list[str]:
    """Train ``layers`` distributed layers with ``plan="auto"`` for two steps; the warnings logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(LIBRARY_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[MoELayer(16, 32, 4, 2, plan="auto") for _ in range(layers)])
    for step in range(2):
        torch.manual_seed(100 * step + rank)
        model(torch.randn(8, 16)).square().mean().backward()
    logger.removeHandler(handler)
    return [r.getMessage() for r in records if NO_CALIBRATION in r.getMessage()]


@pytest.mark.distributed
def test_no_calibration_is_logged_by_rank_0_only(uncalibrated):
    got = run_distributed(_no_calibration_records, 2, 3)
    assert [len(messages) for messages in got] == [1, 0], got


def test_the_command_logs_to_stderr_on_rank_0(capsys):
    logger = logging.getLogger("flexmoe.test.command")
    before = logging.getLogger(LIBRARY_LOGGER).level
    with cli_logging("INFO", rank=0, world_size=1):
        logger.info("step %d", 1)
        logger.debug("hidden")
    with cli_logging("INFO", rank=1, world_size=2):
        logger.info("hidden on rank 1")
        logger.warning("said by rank 1")
    assert capsys.readouterr().err.splitlines() == [
        "INFO flexmoe.test.command: step 1",
        "[rank 1] WARNING flexmoe.test.command: said by rank 1",
    ]
    assert logging.getLogger(LIBRARY_LOGGER).level == before  # restored after the command
    assert level_for_rank("DEBUG", 0) == logging.DEBUG
    assert level_for_rank("DEBUG", 3) == logging.WARNING
    assert level_for_rank("ERROR", 3) == logging.ERROR
