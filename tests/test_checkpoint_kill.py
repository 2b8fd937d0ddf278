"""SIGKILL at random points of a process that saves checkpoints in a loop (most of the time
inside a save), over and over into the same directory: after every kill the checkpoint
``LATEST`` names is intact and is the newest completed save, and so is every directory
named like a checkpoint.

A server process imports torch once and forks one saving worker per round (a fresh
interpreter per kill would spend most of the test importing torch).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import flexmoe
from flexmoe.checkpoint import CheckpointError, load_checkpoint

ROUNDS = 24

# The server: reads "<first step> <log file>" lines; forks a worker that saves steps
# first, first+1, ... (every weight set to the step, so a checkpoint's content tells its
# step), logging "begin N" / "done N"; prints the worker's pid, then "exited" once reaped.
SERVER = r"""
import os, sys, torch
torch.set_num_threads(1)
from torch import nn
import flexmoe
from flexmoe.checkpoint import save_checkpoint

root = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), flexmoe.MoELayer(64, 128, 8, 2, bias=True))
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 64)).sum().backward()
optimizer.step()
for line in sys.stdin:
    first, log = line.split()
    pid = os.fork()
    if pid == 0:
        with open(log, "a", buffering=1) as out:
            step = int(first)
            while True:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float(step))
                out.write(f"begin {step}\n")
                save_checkpoint(root, model, optimizer, step=step, keep=2)
                out.write(f"done {step}\n")
                step += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("exited", flush=True)
"""


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(64, 64), flexmoe.MoELayer(64, 128, 8, 2, bias=True))
    return model, torch.optim.AdamW(model.parameters())


def _load(path: Path) -> int:
    """Load ``path`` (model and optimizer); returns its step, checked against its content."""
    model, optimizer = _model()
    step = load_checkpoint(path, model, optimizer)["step"]
    assert isinstance(step, int)
    for name, p in model.named_parameters():
        assert torch.all(p == float(step)), f"{path}: {name} is not from step {step}"
    return step


def _log_lines(log: Path) -> list[tuple[str, int]]:
    lines = [line.split() for line in log.read_text().splitlines() if line]
    return [(what, int(step)) for what, step in lines]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the saving workers are forked")
def test_sigkill_at_random_points_never_loses_a_completed_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    rng = random.Random(0)
    completed: int | None = None  # the step of the newest save that returned
    killed_inside_a_save = 0
    try:
        for round_ in range(ROUNDS):
            # Continue, re-save the newest steps, or go back: retention and re-saves get hit.
            first = 0 if completed is None else max(0, completed + rng.choice([1, 1, 0, -1, -3]))
            log = tmp_path / f"round{round_}.log"
            server.stdin.write(f"{first} {log}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.25) + (0.5 if completed is None else 0.0))  # a first save completes
            os.kill(pid, 9)
            assert server.stdout.readline().strip() == "exited"

            lines = _log_lines(log) if log.exists() else []
            done = [step for what, step in lines if what == "done"]
            completed = done[-1] if done else completed
            interrupted = lines[-1][1] if lines and lines[-1][0] == "begin" else None
            killed_inside_a_save += interrupted is not None
            # LATEST: the newest completed save, or the interrupted one if it got that far.
            try:
                loaded = _load(root)
            except CheckpointError:
                assert completed is None, f"round {round_}: no checkpoint, but step {completed} completed"
            else:
                assert loaded in (completed, interrupted), (round_, loaded, completed, interrupted)
                completed = loaded  # an interrupted save that LATEST names is the newest from now on
            for path in root.iterdir() if root.exists() else ():
                if re.fullmatch(r"step-\d{6,}", path.name):
                    assert _load(path) == int(path.name.removeprefix("step-"))
    finally:
        server.kill()
        server.wait()
    assert completed is not None and killed_inside_a_save >= ROUNDS // 3, killed_inside_a_save
