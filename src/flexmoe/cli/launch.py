"""A launcher that owns its workers, and a lock that gives a run directory one owner.

``flexmoe train --workers N`` runs ``torchrun`` with ``N`` workers and stays their
owner: whatever ends the launcher, ``SIGKILL`` included, ends every worker before it
can write again. Three layers make that hold:

1. ``torchrun`` runs in its own session with a parent-death signal (Linux ``prctl
   PR_SET_PDEATHSIG``): the kernel kills it the moment the launcher dies.
2. Each worker sets the same signal against ``torchrun`` (which starts the workers in
   sessions of their own, so no process-group signal reaches them) and checks that
   the launcher is still there; a watchdog thread polls the launcher too (the
   fallback where ``prctl`` does not exist), and ``check_launcher_alive`` is called
   before every checkpoint write.
3. ``SIGINT``, ``SIGTERM`` and ``SIGHUP`` of the launcher are forwarded to
   ``torchrun``, which stops its workers; a launcher whose ``torchrun`` does not
   stop within a grace period kills it.

The run directory lock (``RUN_DIR/.flexmoe-run.lock``, an ``fcntl.flock`` held while
the run lives, the owner's pid inside) refuses a second run into the same directory.
The lock file descriptor is inherited by ``torchrun``, so the lock outlives a killed
launcher until its ``torchrun`` is gone too; the kernel releases it with the last
holder, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from flexmoe.cli.log_setup import LOG_LEVELS
from flexmoe.cli.options import CliError
from flexmoe.logs import LIBRARY_LOGGER
from flexmoe.parallel import all_ranks_ok

if sys.platform != "win32":
    import fcntl

__all__ = [
    "LAUNCHER_PID_ENV",
    "RunLock",
    "check_launcher_alive",
    "guard_worker",
    "launch_workers",
    "run_dir_lock",
]

LAUNCHER_PID_ENV = "FLEXMOE_LAUNCHER_PID"  # set by the launcher for its workers: the pid to outlive no longer
LOCK_NAME = ".flexmoe-run.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_GRACE_S = 15.0  # how long a forwarded SIGTERM may take before torchrun is killed
_WATCH_INTERVAL_S = 0.1


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.flexmoe-run.lock``, held until ``release`` (or process exit)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the run directory (creating it), or ``CliError`` naming the live owner."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if sys.platform != "win32":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise CliError(
                    f"--run-dir {run_dir} is in use by a running `flexmoe train` (pid {owner}); "
                    "wait for it to finish or choose another --run-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        """Give the directory up (closing the descriptor drops the lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def run_dir_lock(run_dir: Path, rank: int, *, launched: bool) -> Iterator[None]:
    """Hold ``run_dir`` for this run (a collective under ``torchrun``).

    Under ``flexmoe train --workers`` (``launched``) the launcher already holds it;
    otherwise rank 0 takes it and every rank stops with the same one-line error when
    another run owns the directory.
    """
    lock: RunLock | None = None
    refusal: CliError | None = None
    if rank == 0 and not launched:
        try:
            lock = RunLock.acquire(run_dir)
        except CliError as error:
            refusal = error
    if not all_ranks_ok(refusal is None):
        raise refusal or CliError(f"--run-dir {run_dir} is in use by another `flexmoe train`")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _set_parent_death_signal() -> bool:
    """Ask the kernel to ``SIGKILL`` this process when its parent dies (Linux); whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # dlopen(NULL): the running program's symbols, libc's prctl among them. (Not
        # ctypes.util.find_library, which runs ldconfig: this also runs in preexec_fn.)
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):  # no libc or no prctl: the watchdog still guards
        return False


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): os.kill is all we have
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _launcher_pid() -> int | None:
    text = os.environ.get(LAUNCHER_PID_ENV)
    return int(text) if text and text.isdigit() else None


def check_launcher_alive() -> None:
    """End this worker at once (``SIGKILL``) if its launcher is gone; call it before writing anything."""
    pid = _launcher_pid()
    if pid is not None and not _process_alive(pid):
        os.kill(os.getpid(), signal.SIGKILL)


def guard_worker() -> bool:
    """Tie a worker's life to its launcher (no-op outside ``flexmoe train --workers``); whether launched.

    Sets the parent-death signal against ``torchrun``, then re-checks the launcher
    (it may have died before the signal was set), and starts a watchdog thread that
    kills this worker within ``_WATCH_INTERVAL_S`` of the launcher or ``torchrun`` going.
    """
    launcher = _launcher_pid()
    if launcher is None:
        return False
    parent = os.getppid()
    _set_parent_death_signal()
    check_launcher_alive()
    if os.getppid() != parent:  # torchrun died between our start and the prctl
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            if os.getppid() != parent or not _process_alive(launcher):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="flexmoe-launcher-watch", daemon=True).start()
    return True


def _die_with_launcher(launcher: int) -> None:
    """``preexec_fn`` of torchrun: the parent-death signal, then make sure the launcher is still there."""
    _set_parent_death_signal()
    if os.getppid() != launcher:
        os._exit(1)


def launch_workers(train_argv: list[str], workers: int, lock: RunLock) -> None:
    """Run ``flexmoe train`` (``train_argv``: its full flags) on ``workers`` processes under ``torchrun``.

    Returns when every worker is done; ``CliError`` (exit code 1) if one failed. The
    workers log at this process's level (its ``--log-level``).
    """
    level = logging.getLevelName(logging.getLogger(LIBRARY_LOGGER).getEffectiveLevel())
    log_level = [f"--log-level={level}"] if level in LOG_LEVELS else []  # else the workers' default
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={workers}",
        "-m",
        "flexmoe.cli",
        *log_level,
        "train",
        *train_argv,
    ]
    launcher = os.getpid()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        LAUNCHER_PID_ENV: str(launcher),
    }
    process = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,  # our own signals only: a terminal's ^C comes through the launcher
        pass_fds=(lock.fd,),  # torchrun keeps the run directory locked while it lives
        preexec_fn=lambda: _die_with_launcher(launcher),
    )
    code, stopped_by = _wait_forwarding_signals(process)
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        raise CliError(f"stopped by {name}: torchrun and every worker have stopped", code=128 + stopped_by)
    if code != 0:
        raise CliError(f"a worker failed (torchrun exit code {code}); see the lines above", code=1)


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> tuple[int, int | None]:
    """Wait for ``process``: its exit code, and the signal that stopped it (``None`` if none did).

    ``SIGINT``/``SIGTERM``/``SIGHUP`` are forwarded as ``SIGTERM`` (torchrun then stops its
    workers); if it has not exited ``_STOP_GRACE_S`` later, it is killed.
    """
    received: list[tuple[int, float]] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not received:
            received.append((signum, time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # torchrun terminates its workers

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, forward) for s in handled} if in_main else {}
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                return code, received[0][0] if received else None
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > _STOP_GRACE_S:
                    os.killpg(process.pid, signal.SIGKILL)  # its workers follow (parent-death signal)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:  # an exception got us here: leave nothing behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
