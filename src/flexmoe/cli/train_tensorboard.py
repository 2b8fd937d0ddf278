"""``flexmoe train --tensorboard DIR``: the scalars of ``metrics.jsonl`` as TensorBoard events.

One function, ``record_scalars``, says which scalars a ``metrics.jsonl`` record holds
and under which tags, so the event file and the metrics file cannot disagree:

- ``train/loss``, ``train/lr``, ``train/aux_loss``, ``train/grad_norm`` and, per MoE
  layer ``i``, ``layer<i>/dropped``, ``layer<i>/rerouted_rows``, ``layer<i>/expert_copies``,
  ``layer<i>/experts_per_token``, ``layer<i>/skip_rate`` and (with top-p)
  ``layer<i>/top_p``: every training step;
- ``train/tokens_per_s`` and ``layer<i>/load_max_over_mean``: every logged step;
- ``eval/loss``: every evaluation.

Needs the ``tensorboard`` extra (``pip install 'flexmoe[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexmoe.cli.options import CliError, one_line

__all__ = ["TensorBoardLog", "record_scalars", "require_tensorboard"]

_MISSING = "argument --tensorboard: needs the tensorboard package: pip install 'flexmoe[tensorboard]'"
_PER_STEP = ("loss", "lr", "aux_loss", "grad_norm")
_PER_STEP_LAYER = ("dropped", "rerouted_rows", "expert_copies", "experts_per_token", "skip_rate", "top_p")


def require_tensorboard() -> None:
    """Raise ``CliError`` (one line naming the extra) when ``torch.utils.tensorboard`` cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise CliError(_MISSING) from None


def record_scalars(record: dict[str, Any]) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar in one ``metrics.jsonl`` record (see the module docstring)."""
    if "eval_loss" in record:
        return [("eval/loss", record["step"], record["eval_loss"])]
    out: list[tuple[str, int, float]] = []
    per_step = record.get("per_step", {})
    steps = per_step.get("step", [])
    for name in _PER_STEP:
        out += [(f"train/{name}", s, v) for s, v in zip(steps, per_step.get(name, []), strict=False)]
    for i, layer in enumerate(per_step.get("layers", [])):
        for name in _PER_STEP_LAYER:
            values = zip(steps, layer.get(name, []), strict=False)
            out += [(f"layer{i}/{name}", s, v) for s, v in values if v is not None]  # top_p: None when off
    out.append(("train/tokens_per_s", record["step"], record["tokens_per_s"]))
    for i, layer in enumerate(record["layers"]):
        out.append((f"layer{i}/load_max_over_mean", record["step"], layer["load_max_over_mean"]))
    return out


class TensorBoardLog:
    """A ``SummaryWriter`` that takes ``metrics.jsonl`` records (rank 0 only; ``close`` flushes)."""

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CliError(_MISSING) from None
        try:
            self.writer: Any = SummaryWriter(log_dir=str(directory))
        except OSError as error:
            reason = one_line(error)
            raise CliError(f"argument --tensorboard: cannot write to {directory}: {reason}") from None

    def write(self, record: dict[str, Any]) -> None:
        """Add every scalar of ``record``."""
        for tag, step, value in record_scalars(record):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush the events to disk and close the file (safe to call twice)."""
        self.writer.flush()
        self.writer.close()
