"""Offline training data: the Python standard library's own source files, byte-level.

Every machine with Python has them, so the main job needs no download.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ByteCorpus", "stdlib_corpus"]


@dataclass
class ByteCorpus:
    """A byte sequence split into train and validation parts."""

    train: Tensor  # uint8 [n_train]
    val: Tensor  # uint8 [n_val]
    source: str

    def batch(
        self, split: str, batch_size: int, context: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows: inputs ``[B, context]`` and next-byte targets (int64)."""
        data = self.train if split == "train" else self.val
        if len(data) <= context + 1:
            raise ValueError(f"context must be < {len(data) - 1} for the {split} split, got {context}")
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        window = starts[:, None] + torch.arange(context + 1)
        chunk = data[window].long()
        return chunk[:, :-1], chunk[:, 1:]


def stdlib_corpus(max_bytes: int = 8_000_000, val_fraction: float = 0.05) -> ByteCorpus:
    """The standard library's ``.py`` files, in sorted path order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        pieces.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not pieces:
        raise FileNotFoundError(f"no Python source files found under {root}")
    blob = np.frombuffer(b"".join(pieces)[:max_bytes], dtype=np.uint8).copy()
    split = int(len(blob) * (1 - val_fraction))
    corpus = torch.from_numpy(blob)
    return ByteCorpus(train=corpus[:split], val=corpus[split:], source=str(root))
