"""The routing-trace format: per-layer, per-step expert counts, one JSON object per line.

A trace file (``.jsonl``, or ``.jsonl.gz`` compressed) starts with a header line,
then holds one record per (step, layer)::

    {"format": "flexmoe-routing-trace", "version": 1, "num_experts": 8, "top_k": 2,
     "world_size": 4, "meta": {...}}
    {"step": 0, "layer": "blocks.0.moe", "tokens": 2048, "counts": [512, 480, ...]}
    {"step": 0, "layer": "blocks.1.moe", "tokens": 2048, "counts": [...],
     "counts_per_rank": [[...], [...], [...], [...]]}

- ``counts[e]``: assignments routed to expert ``e`` in that step, over all ranks,
  before any capacity drop (``layer.stats.routed_per_expert``); they sum to
  ``tokens * top_k``.
- ``tokens``: tokens of the global batch in that step.
- ``counts_per_rank`` (optional): the same per source rank, ``[W][E]``.
- ``world_size`` and ``meta`` (free-form, such as the model name) are optional.

Lines are appended as the run goes (a crash keeps every finished step); readers
ignore unknown keys, so later versions can add fields. The writer is the stub the
online tuner's recorder fills; the simulator replays a trace with ``Load.from_counts``
(one step) or ``RoutingTrace.mean_counts`` (a whole layer).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["TRACE_FORMAT", "RoutingTrace", "RoutingTraceWriter", "TraceRecord", "read_routing_trace"]

TRACE_FORMAT = "flexmoe-routing-trace"


def _open(path: Path, mode: str) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


@dataclass(frozen=True)
class TraceRecord:
    """One layer's routing in one step."""

    step: int
    layer: str
    tokens: int
    counts: tuple[int, ...]
    counts_per_rank: tuple[tuple[int, ...], ...] | None = None


@dataclass
class RoutingTrace:
    """A read trace: its header fields and records in file order."""

    num_experts: int
    top_k: int
    world_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    records: list[TraceRecord] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """Layer names in order of first appearance."""
        return list(dict.fromkeys(r.layer for r in self.records))

    def steps(self, layer: str | None = None) -> list[TraceRecord]:
        """Records of ``layer`` (default: the first layer), in step order."""
        name = self.layers[0] if layer is None else layer
        chosen = [r for r in self.records if r.layer == name]
        if not chosen:
            raise ValueError(f"layer {name!r} is not in the trace (layers: {self.layers})")
        return sorted(chosen, key=lambda r: r.step)

    def mean_counts(self, layer: str | None = None) -> NDArray[np.float64]:
        """Per-expert counts of ``layer`` averaged over its steps."""
        counts = np.array([r.counts for r in self.steps(layer)], dtype=np.float64)
        mean: NDArray[np.float64] = counts.mean(axis=0)
        return mean


class RoutingTraceWriter:
    """Appends records to a trace file; writes the header when the file is new or empty.

    Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        path: str | Path,
        num_experts: int,
        top_k: int,
        world_size: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.num_experts = num_experts
        self.top_k = top_k
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            existing = read_routing_trace(self.path)
            if (existing.num_experts, existing.top_k) != (num_experts, top_k):
                raise ValueError(
                    f"{self.path} holds a trace of {existing.num_experts} experts, top-{existing.top_k}; "
                    f"cannot append {num_experts} experts, top-{top_k}"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open(self.path, "a")
        if fresh:
            header: dict[str, Any] = {
                "format": TRACE_FORMAT,
                "version": 1,
                "num_experts": num_experts,
                "top_k": top_k,
            }
            if world_size is not None:
                header["world_size"] = world_size
            if meta:
                header["meta"] = meta
            self._file.write(json.dumps(header) + "\n")

    def write(
        self,
        step: int,
        layer: str,
        counts: Sequence[int],
        tokens: int | None = None,
        counts_per_rank: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append one record; ``tokens`` defaults to ``sum(counts) / top_k``."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have num_experts={self.num_experts} entries, got {len(counts)}")
        values = [int(c) for c in counts]
        record: dict[str, Any] = {
            "step": int(step),
            "layer": str(layer),
            "tokens": int(tokens) if tokens is not None else sum(values) // self.top_k,
            "counts": values,
        }
        if counts_per_rank is not None:
            record["counts_per_rank"] = [[int(c) for c in row] for row in counts_per_rank]
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

    def __enter__(self) -> RoutingTraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _records(lines: Iterator[str], path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error


def read_routing_trace(path: str | Path) -> RoutingTrace:
    """Read a trace file; raises ``ValueError`` on a bad header or record."""
    path = Path(path)
    with _open(path, "r") as file:
        items = _records(iter(file), path)
        header = next(items, None)
        if header is None or header.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: not a flexmoe routing trace (no {TRACE_FORMAT!r} header line)")
        trace = RoutingTrace(
            num_experts=int(header["num_experts"]),
            top_k=int(header["top_k"]),
            world_size=header.get("world_size"),
            meta=dict(header.get("meta", {})),
        )
        for item in items:
            counts = tuple(int(c) for c in item["counts"])
            if len(counts) != trace.num_experts:
                raise ValueError(
                    f"{path}: step {item.get('step')} layer {item.get('layer')!r} has {len(counts)} counts, "
                    f"the header says {trace.num_experts} experts"
                )
            per_rank = item.get("counts_per_rank")
            trace.records.append(
                TraceRecord(
                    step=int(item["step"]),
                    layer=str(item["layer"]),
                    tokens=int(item["tokens"]),
                    counts=counts,
                    counts_per_rank=None
                    if per_rank is None
                    else tuple(tuple(int(c) for c in r) for r in per_rank),
                )
            )
    return trace
