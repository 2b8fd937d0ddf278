"""SIGKILL ``flexmoe train`` at random points, again and again, resuming each time.

After every kill the checkpoint ``LATEST`` names is intact (it loads), no completed
checkpoint is lost (the newest step never goes back), and the next run resumes from it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from flexmoe.checkpoint import CheckpointError, latest_checkpoint

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress", "--eval-every", "100000"]


def _newest_step(checkpoints: Path) -> int:
    try:
        path = latest_checkpoint(checkpoints)
    except (CheckpointError, FileNotFoundError, OSError):
        return -1
    return int(json.loads((path / "manifest.json").read_text())["step"])


def _train(run: Path, steps: int, resume: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "flexmoe.cli", "train", *TINY, "--steps", str(steps), "--run-dir", str(run)]
    args += ["--checkpoint-every", "1", "--keep-checkpoints", "2"]
    if resume:
        args += ["--resume", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_sigkill_of_flexmoe_train_never_loses_a_completed_checkpoint(tmp_path):
    run, rng = tmp_path / "run", random.Random(0)
    checkpoints = run / "checkpoints"
    newest = -1
    for _ in range(5):
        proc = _train(run, steps=10_000, resume=newest >= 0)
        deadline = time.monotonic() + 90
        while _newest_step(checkpoints) <= newest and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.3))  # then anywhere: inside a step, a save, a prune
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = _newest_step(checkpoints)
        assert step > newest, f"the newest checkpoint went from step {newest} to {step}"
        newest = step
    # The last one resumes and finishes: the checkpoint loads and training goes on from it.
    final = _train(run, steps=newest + 2, resume=True)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err.decode()
    assert _newest_step(checkpoints) == newest + 2
