"""`flexmoe train --workers N` owns its workers (issue 14, item 3): SIGKILL of the launcher stops
torchrun and every worker before they write again, and a run directory has one live run at a time."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flexmoe.cli import main
from flexmoe.cli.launch import RunLock
from flexmoe.cli.options import CliError

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress"]


def _children() -> dict[int, list[int]]:
    """``{pid: child pids}`` of every process, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(parent, []).append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (our container's init may be slow to reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A 2-worker run that checkpoints every 2 steps and would go on for a long time."""
    run = tmp_path_factory.mktemp("launch") / "run"
    command = [sys.executable, "-m", "flexmoe.cli", "train", "--workers", "2", *TINY, "--steps", "1000000"]
    command += ["--checkpoint-every", "2", "--log-every", "5", "--run-dir", str(run)]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (run / "checkpoints" / "LATEST").exists(), 180, "no checkpoint written")
        yield launcher, run
    finally:
        for pid in [*_descendants(launcher.pid), launcher.pid]:  # whatever the test left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


@pytest.mark.distributed
def test_a_second_run_into_a_live_run_directory_is_refused(live_run, capsys):
    launcher, run = live_run
    with pytest.raises(SystemExit) as caught:
        main(["train", *TINY, "--steps", "1", "--run-dir", str(run)])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"flexmoe train: error: --run-dir {run} is in use by a running `flexmoe train` (pid {launcher.pid}); "
        "wait for it to finish or choose another --run-dir\n"
    )


@pytest.mark.distributed
def test_sigkill_of_the_launcher_stops_every_worker(live_run):
    launcher, run = live_run
    processes = _descendants(launcher.pid)  # torchrun and its two workers
    assert len(processes) >= 3, processes
    launcher.send_signal(signal.SIGKILL)  # no handler runs: the kernel's parent-death signals act
    launcher.wait()
    _wait_for(lambda: not any(_running(pid) for pid in processes), 5, "workers still running")
    before = _snapshot(run)
    time.sleep(1.5)
    assert _snapshot(run) == before  # nobody writes into the run directory any more
    RunLock.acquire(run).release()  # and the directory is free again: no stale lock


def test_the_run_lock_is_exclusive_and_released(tmp_path):
    lock = RunLock.acquire(tmp_path / "run")
    with pytest.raises(CliError, match=f"is in use by a running `flexmoe train` \\(pid {os.getpid()}\\)"):
        RunLock.acquire(tmp_path / "run")
    lock.release()
    RunLock.acquire(tmp_path / "run").release()


@pytest.mark.distributed
def test_sigterm_of_the_launcher_stops_the_workers_and_says_so(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "flexmoe.cli", "train", "--workers", "2", *TINY, "--steps", "1000000"]
    launcher = subprocess.Popen(
        [*command, "--checkpoint-every", "2", "--run-dir", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (run / "checkpoints" / "LATEST").exists(), 180, "no checkpoint written")
        processes = _descendants(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=30)
        assert launcher.returncode == 128 + signal.SIGTERM
        assert err.splitlines()[-1] == (
            "flexmoe train: error: stopped by SIGTERM: torchrun and every worker have stopped"
        )
        assert not any(_running(pid) for pid in processes)
    finally:
        for pid in [*_descendants(launcher.pid), launcher.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
