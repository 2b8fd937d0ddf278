"""Checkpoints are never lost: retention by the manifest's step that spares the new and the
``LATEST`` checkpoint, re-saves as atomic as first saves, and a crash at any file-system
operation of a save leaves ``LATEST`` naming an intact checkpoint of the newest completed step."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flexmoe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

from .parallel_workers import checkpoint_model

CHECKPOINT_NAME = re.compile(r"step-\d{6,}")


class Crash(BaseException):
    """Stands for the process dying: not an ``Exception``, so no handler of the save catches it."""


def _steps_on_disk(root: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("step-")) for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)
    )


def _model_with_marker(value: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The checkpoint model with every weight set to ``value`` (to tell saves apart)."""
    model, optimizer = checkpoint_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model, optimizer


def _loaded_marker(root: Path) -> tuple[int, float]:
    """(step, marker) of the checkpoint ``LATEST`` names, loaded into a fresh model."""
    model, _ = checkpoint_model()
    step = load_checkpoint(root, model)["step"]
    return step, float(model[0].weight[0, 0].detach())


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    # A finished run (steps 2, 4, 6, keep 2), then a new run into the same directory saves
    # step 3: it sorts lowest, but it is the newest save and LATEST names it.
    model, optimizer = checkpoint_model()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model, optimizer, step=step, keep=2)
    assert _steps_on_disk(tmp_path) == [4, 6]
    path = save_checkpoint(tmp_path, model, optimizer, step=3, keep=2)
    assert path.is_dir() and latest_checkpoint(tmp_path) == path
    fresh, fresh_opt = checkpoint_model()
    assert load_checkpoint(tmp_path, fresh, fresh_opt)["step"] == 3
    # Besides the protected one, the newest by step: `keep` checkpoints in all.
    assert _steps_on_disk(tmp_path) == [3, 6]


def test_retention_orders_by_the_manifest_step_not_the_name(tmp_path):
    # "step-1000000" sorts before "step-999999" as a name.
    model, _ = checkpoint_model()
    save_checkpoint(tmp_path, model, step=999_999, keep=1)
    path = save_checkpoint(tmp_path, model, step=1_000_000, keep=1)
    assert path.name == "step-1000000" and latest_checkpoint(tmp_path) == path
    assert _steps_on_disk(tmp_path) == [1_000_000]
    save_checkpoint(tmp_path, model, step=1_000_001, keep=2)
    assert _steps_on_disk(tmp_path) == [1_000_000, 1_000_001]


def test_keep_one_keeps_only_the_new_checkpoint(tmp_path):
    model, _ = checkpoint_model()
    for step in (5, 1):
        save_checkpoint(tmp_path, model, step=step, keep=1)
    assert _steps_on_disk(tmp_path) == [1] and latest_checkpoint(tmp_path).name == "step-000001"


def test_resave_of_a_step_replaces_it(tmp_path):
    old, _ = _model_with_marker(1.0)
    save_checkpoint(tmp_path, old, step=3)
    new, _ = _model_with_marker(2.0)
    path = save_checkpoint(tmp_path, new, step=3)
    assert path.name == "step-000003" and latest_checkpoint(tmp_path) == path
    assert _loaded_marker(tmp_path) == (3, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000003"]


# Every file-system operation a save may make; a crash is injected before the n-th one.
_OPERATIONS: tuple[tuple[Any, str], ...] = (
    (os, "replace"),
    (os, "rename"),
    (os, "link"),
    (os, "unlink"),
    (os, "rmdir"),
    (os, "mkdir"),
    (os, "fsync"),
    (shutil, "rmtree"),
    (shutil, "copyfile"),
)


@contextmanager
def _crash_at(n: int) -> Iterator[list[str]]:
    """Raise ``Crash`` instead of the ``n``-th file-system operation (counting from 1)."""
    calls: list[str] = []
    saved = [(module, name, getattr(module, name)) for module, name in _OPERATIONS]

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if len(calls) == n:
                raise Crash(f"killed before {name} (operation {n})")
            return real(*args, **kwargs)

        return operation

    for module, name, real in saved:
        setattr(module, name, wrap(name, real))
    try:
        yield calls
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def _every_checkpoint_loads(root: Path) -> None:
    for path in root.iterdir():
        if CHECKPOINT_NAME.fullmatch(path.name):
            model, _ = checkpoint_model()
            load_checkpoint(path, model)  # no half-deleted or half-written checkpoint under its name


def _crash_everywhere(tmp_path: Path, history: list[tuple[int, float]], save: tuple[int, float]) -> int:
    """Replay ``history`` (completed saves), then crash ``save`` at each operation in turn.

    After every crash ``LATEST`` names an intact checkpoint: the last completed save, or
    the interrupted one if it got far enough; every directory named like a checkpoint
    loads; and the next save completes. Returns how many crash points there were.
    """
    n = 0
    while True:
        n += 1
        root = tmp_path / f"crash{n}"
        for step, marker in history:
            save_checkpoint(root, _model_with_marker(marker)[0], step=step, keep=2)
        step, marker = save
        with _crash_at(n) as calls:
            try:
                save_checkpoint(root, _model_with_marker(marker)[0], step=step, keep=2)
            except Crash:
                pass
            else:
                return n - 1
        assert _loaded_marker(root) in (history[-1], save), (n, calls)
        _every_checkpoint_loads(root)
        save_checkpoint(root, _model_with_marker(9.0)[0], step=step + 1, keep=2)
        assert _loaded_marker(root) == (step + 1, 9.0)
        assert all(CHECKPOINT_NAME.fullmatch(p.name) for p in root.iterdir() if p.name != "LATEST"), sorted(
            p.name for p in root.iterdir()
        )
        shutil.rmtree(root)


def test_a_crash_anywhere_in_a_resave_leaves_an_intact_checkpoint(tmp_path):
    # Step 3 exists and LATEST names it; a second save of step 3 dies at every point in turn.
    points = _crash_everywhere(tmp_path, [(1, 1.0), (3, 3.0)], (3, 4.0))
    assert points >= 8


def test_a_crash_anywhere_in_a_save_with_pruning_leaves_an_intact_checkpoint(tmp_path):
    # keep=2 with steps 1, 2 on disk: saving 3 prunes step 1 (its deletion interrupted too).
    points = _crash_everywhere(tmp_path, [(1, 1.0), (2, 2.0)], (3, 3.0))
    assert points >= 8


def test_leftovers_of_interrupted_saves_are_cleaned_by_the_next_save(tmp_path):
    model, _ = checkpoint_model()
    save_checkpoint(tmp_path, model, step=1)
    for name in ("step-000002.partial", "step-000001.old", "step-000001.tmp", "step-000007.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "junk").write_text("x")
    (tmp_path / "LATEST.tmp").write_text("garbage")
    assert latest_checkpoint(tmp_path).name == "step-000001"  # loading ignores them
    save_checkpoint(tmp_path, model, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000001", "step-000002"]


def test_retention_leaves_directories_it_does_not_recognise(tmp_path):
    # Only complete checkpoints count and are pruned; a user's files are not touched.
    model, _ = checkpoint_model()
    (tmp_path / "step-000000").mkdir(parents=True)  # no manifest: not a checkpoint
    (tmp_path / "notes").mkdir()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, step=step, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "notes", "step-000000", "step-000003"]
