"""The checkpoint directory: ``LATEST``, publishing a finished checkpoint, retention.

Names in a checkpoint directory ``DIR`` (``N`` the step, at least six digits)::

    LATEST               the name of the newest completed checkpoint (replaced atomically)
    step-N/              a complete checkpoint
    step-N.partial/      a save in progress (or one that died): never complete, never named
    step-N.new/          a complete re-save of step N, waiting to take the name step-N
    step-N.old/ .tmp/ .deleting/   transient names while a checkpoint is replaced or deleted

The invariant: ``LATEST`` always names a complete checkpoint. A first save renames its
``.partial`` directory to ``step-N`` and then points ``LATEST`` at it. A re-save of an
existing step cannot rename over it (a non-empty directory cannot be replaced), so it
points ``LATEST`` at ``step-N.new`` first, moves the old ``step-N`` aside, builds the new
``step-N`` from hard links (or copies) of ``.new``'s files, renames it in and points
``LATEST`` back at ``step-N``. Whatever point a crash interrupts, the next save finishes
the move (``repair``) and deletes the transient directories; loading never writes.
Retention deletes by the step in each manifest, never the new checkpoint or ``LATEST``'s,
and renames a checkpoint to ``.deleting`` before deleting it so that no half-deleted
directory keeps a checkpoint's name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.files import (
    check_plain_name,
    fsync_dir,
    fsync_file,
    read_json,
    resolve_inside,
    write_text_atomic,
)

__all__ = [
    "checkpoint_name",
    "latest_checkpoint",
    "prepare_partial",
    "prune",
    "publish",
]

CHECKPOINT = re.compile(r"step-\d{6,}")
TRANSIENT = re.compile(r"step-\d{6,}\.(partial|new|old|tmp|deleting)")
AWAITING_NAME = re.compile(r"step-\d{6,}\.new")
MAX_LATEST_BYTES = 4096


def checkpoint_name(step: int) -> str:
    """``step-000120``: the directory name of checkpoint ``step``."""
    return f"step-{step:06d}"


# ------------------------------------------------------------------ LATEST


def read_latest(root: Path) -> str:
    """The name ``root/LATEST`` holds, validated as a plain name (it need not exist)."""
    pointer = root / "LATEST"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint in {root}: neither manifest.json nor LATEST is there")
    with open(pointer, "rb") as f:
        data = f.read(MAX_LATEST_BYTES + 1)
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not a checkpoint name (not UTF-8 text)") from None
    return check_plain_name(name, str(pointer))


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """The newest complete checkpoint in ``directory`` (or ``directory`` itself if it is one).

    Reads ``LATEST`` and refuses a name that is not a plain name, that leaves
    ``directory`` (``..``, an absolute path, a symbolic link out) or that has no manifest.
    """
    root = Path(directory)
    if (root / "manifest.json").is_file():
        return root
    name = read_latest(root)
    path = resolve_inside(root, name, f"{root / 'LATEST'}")
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"{root / 'LATEST'} names {name}, which has no manifest.json")
    return path


def _point_latest(root: Path, name: str) -> None:
    """Make ``LATEST`` name ``name``, atomically and durably."""
    write_text_atomic(root / "LATEST", name + "\n")


# ------------------------------------------------------------------ publishing


def prepare_partial(root: Path, name: str) -> Path:
    """Finish or clean up interrupted saves in ``root``, then return a fresh ``name.partial/``."""
    root.mkdir(parents=True, exist_ok=True)
    repair(root)
    partial = root / f"{name}.partial"
    partial.mkdir()
    return partial


def publish(root: Path, partial: Path, name: str) -> Path:
    """Give the complete checkpoint ``partial`` the name ``name`` and point ``LATEST`` at it.

    ``partial`` and everything in it must already be durable. Returns ``root / name``.
    """
    final = root / name
    if not final.exists():
        os.rename(partial, final)
        fsync_dir(root)
        _point_latest(root, name)
        return final
    new = root / f"{name}.new"
    os.rename(partial, new)
    fsync_dir(root)
    _point_latest(root, new.name)
    _take_name(root, new, name)
    return final


def _take_name(root: Path, new: Path, name: str) -> None:
    """Move the complete checkpoint ``new`` (which ``LATEST`` names) to ``name``; idempotent.

    Steps, each safe to interrupt (``LATEST`` keeps naming ``new`` until the last):
    1. the old ``name`` goes aside to ``name.old``;
    2. ``name.tmp`` gets hard links to (or copies of) ``new``'s files and becomes ``name``;
    3. ``LATEST`` names ``name``; then ``name.old`` and ``new`` are deleted.
    """
    final, old, tmp = root / name, root / f"{name}.old", root / f"{name}.tmp"
    for leftover in (old, tmp):
        if leftover.exists():
            shutil.rmtree(leftover)
    if final.exists():
        os.rename(final, old)
    tmp.mkdir()
    for file in sorted(new.iterdir()):
        _link_or_copy(file, tmp / file.name)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(root)
    _point_latest(root, name)
    for leftover in (old, new):
        if leftover.exists():
            shutil.rmtree(leftover)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link ``target`` to ``source`` (files of a checkpoint never change), else a durable copy."""
    try:
        os.link(source, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, target)
        fsync_file(target)


def repair(root: Path) -> None:
    """Finish a re-save that a crash interrupted, then delete every transient directory.

    Only names matching the transient pattern (and ``LATEST.tmp``) are deleted, and never
    the one ``LATEST`` names: after ``_take_name`` finishes, ``LATEST`` names a checkpoint.
    """
    try:
        latest = read_latest(root)
    except CheckpointError:
        latest = None
    new = None if latest is None else root / latest
    if new is not None and AWAITING_NAME.fullmatch(new.name) and new.is_dir() and not new.is_symlink():
        latest = new.name.removesuffix(".new")
        _take_name(root, new, latest)
    for path in list(root.iterdir()):
        if path.name == latest:
            continue
        if TRANSIENT.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.name == "LATEST.tmp":
            path.unlink()


# ------------------------------------------------------------------ retention


def _manifest_step(path: Path) -> int | None:
    """The step in ``path``'s manifest, or ``None`` if ``path`` is not a readable checkpoint."""
    if path.is_symlink() or not (path / "manifest.json").is_file():
        return None
    try:
        step = read_json(path / "manifest.json", str(path / "manifest.json")).get("step")
    except (CheckpointError, OSError):
        return None
    return step if type(step) is int else None


def prune(root: Path, keep: int, protect: str) -> None:
    """Delete all but ``keep`` checkpoints in ``root``: ``protect`` and ``LATEST``'s, then the newest by step.

    The step is the manifest's, not the directory name's (names of steps past 999999 do
    not sort). Directories that are not readable checkpoints are left alone.
    """
    try:
        protected = {protect, read_latest(root)}
    except CheckpointError:
        protected = {protect}
    steps = {
        path.name: step
        for path in root.iterdir()
        if CHECKPOINT.fullmatch(path.name) and (step := _manifest_step(path)) is not None
    }
    others = sorted((n for n in steps if n not in protected), key=lambda n: (steps[n], n), reverse=True)
    room = max(0, keep - len(protected & steps.keys()))
    for name in others[room:]:
        doomed = root / f"{name}.deleting"
        os.rename(root / name, doomed)
        fsync_dir(root)
        shutil.rmtree(doomed)
