"""Routing traces: per-layer, per-step expert counts in one JSON object per line.

**Format.** A trace file (``.jsonl``, or ``.jsonl.gz`` compressed) starts with a
header line, then holds one record per (step, layer)::

    {"format": "flexmoe-routing-trace", "version": 1, "num_experts": 8, "top_k": 2,
     "world_size": 4, "meta": {...}}
    {"step": 0, "layer": "blocks.0.moe", "tokens": 2048, "counts": [512, 480, ...]}
    {"step": 0, "layer": "blocks.1.moe", "tokens": 2048, "counts": [...],
     "counts_per_rank": [[...], [...], [...], [...]]}

- ``counts[e]``: assignments routed to expert ``e`` in that step, over all ranks,
  before any capacity drop (``layer.stats.routed_per_expert`` summed over the step's
  forward calls); they sum to ``tokens * top_k`` (checked on write). In a recorded
  step none exceeds ``tokens`` (a token picks ``top_k`` distinct experts), which
  replaying the step in a layer needs.
- ``tokens``: tokens of the global batch in that step.
- ``counts_per_rank`` (optional): the same per source rank, ``[W][E]``.
- ``experts_per_token`` (optional; top-p routing, zero-computation experts): how many
  tokens used ``0, 1, ..., top_k`` routed experts (``layer.stats.experts_per_token``
  summed), ``top_k + 1`` entries. With it the counts sum to the routed assignments
  ``sum_j j * experts_per_token[j]`` instead of ``tokens * top_k``, and the entries sum
  to ``tokens``. Absent: every token used ``top_k`` experts.
- ``world_size`` and ``meta`` (free-form, such as the model name) are optional.

Lines are appended and flushed step by step, so a crash keeps every finished step: the
reader accepts a file cut anywhere (a partial last line, a gzip stream without its
end) and sets ``RoutingTrace.truncated``; appending to such a file first rewrites it
without the cut tail. Readers ignore unknown keys, so later versions can add fields.

**Recording.** ``RoutingRecorder(model, path)`` hooks every ``MoELayer`` of a model
and writes one record per layer per ``step()`` (``flexmoe train --trace PATH`` does
this for its runs). **Replaying** (``flexmoe.planner.replay``): the simulator predicts
every recorded step (``simulate_trace``, ``flexmoe plan --load trace:PATH --per-step``),
and ``expert_ids_from_counts`` + ``force_routing`` make a real layer route a recorded
step's counts exactly. ``RoutingTrace.mean_counts`` gives a layer's average load
(``flexmoe plan --load trace:PATH[:LAYER]``).

Legend: E experts.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "TRACE_FORMAT",
    "RoutingTrace",
    "RoutingTraceWriter",
    "TraceRecord",
    "read_routing_trace",
]

TRACE_FORMAT = "flexmoe-routing-trace"
TRACE_VERSION = 1


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
    experts_per_token: tuple[int, ...] | None = None

    @property
    def mean_experts_per_token(self) -> float:
        """Routed assignments per token in this step (``top_k`` unless a per-token number)."""
        return sum(self.counts) / self.tokens if self.tokens else 0.0


@dataclass
class RoutingTrace:
    """A read trace: its header fields and records in file order.

    ``truncated`` is set when the file ended inside a line or a gzip stream (a run
    that crashed while writing); the records are then the complete ones before it.
    """

    num_experts: int
    top_k: int
    world_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    records: list[TraceRecord] = field(default_factory=list)
    truncated: bool = False

    @property
    def layers(self) -> list[str]:
        """Layer names in order of first appearance."""
        return list(dict.fromkeys(r.layer for r in self.records))

    def steps(self, layer: str | None = None) -> list[TraceRecord]:
        """Records of ``layer`` (default: the first layer), in step order."""
        if not self.records:
            raise ValueError("the trace holds no records")
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


def check_counts(
    counts: Sequence[int],
    num_experts: int,
    top_k: int,
    tokens: int | None,
    tokens_name: str = "tokens",
    distinct: bool = True,
    experts_per_token: Sequence[int] | None = None,
) -> int:
    """Validate one step's counts (ints); returns its token count (``sum / top_k`` when not given).

    ``distinct``: also check that no count exceeds the tokens (each token's experts distinct).
    ``experts_per_token``: the step's histogram of routed experts per token (``top_k + 1``
    entries): the counts then sum to ``sum_j j * experts_per_token[j]`` and the tokens are
    its sum.
    """
    if len(counts) != num_experts:
        raise ValueError(f"counts must have num_experts={num_experts} entries, got {len(counts)}")
    if min(counts) < 0:
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    total = sum(counts)
    if experts_per_token is not None:
        hist = list(experts_per_token)
        if len(hist) != top_k + 1 or min(hist) < 0:
            raise ValueError(f"experts_per_token must hold top_k + 1 = {top_k + 1} counts >= 0, got {hist}")
        if tokens is not None and sum(hist) != tokens:
            raise ValueError(f"experts_per_token must sum to {tokens_name}={tokens}, got {sum(hist)}")
        tokens = sum(hist)
        routed = sum(j * h for j, h in enumerate(hist))
        if total != routed:
            raise ValueError(
                f"counts must sum to the routed assignments of experts_per_token ({routed}), got {total}"
            )
    elif tokens is None:
        if total % top_k:
            raise ValueError(f"counts must sum to a multiple of top_k={top_k}, got a sum of {total}")
        tokens = total // top_k
    elif total != tokens * top_k:
        raise ValueError(
            f"counts must sum to {tokens_name}*top_k={tokens}*{top_k}={tokens * top_k}, got {total}"
        )
    if distinct and max(counts) > tokens:
        raise ValueError(
            f"counts must each be <= {tokens_name}={tokens} (a token picks top_k distinct experts), "
            f"got {max(counts)}"
        )
    return tokens


def _header_line(num_experts: int, top_k: int, world_size: int | None, meta: dict[str, Any] | None) -> str:
    header: dict[str, Any] = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "num_experts": num_experts,
        "top_k": top_k,
    }
    if world_size is not None:
        header["world_size"] = world_size
    if meta:
        header["meta"] = meta
    return json.dumps(header) + "\n"


def _record_line(record: TraceRecord) -> str:
    item: dict[str, Any] = {
        "step": record.step,
        "layer": record.layer,
        "tokens": record.tokens,
        "counts": list(record.counts),
    }
    if record.counts_per_rank is not None:
        item["counts_per_rank"] = [list(row) for row in record.counts_per_rank]
    if record.experts_per_token is not None:
        item["experts_per_token"] = list(record.experts_per_token)
    return json.dumps(item, separators=(",", ":")) + "\n"


class RoutingTraceWriter:
    """Appends records to a trace file; writes the header when the file is new or empty.

    Appending to an existing trace checks that it has the same ``num_experts`` and
    ``top_k``; when it was cut by a crash, or ``keep_before_step`` is given and it
    holds records of that step or later (a run resumed from an earlier checkpoint),
    it is first rewritten without them. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        path: str | Path,
        num_experts: int,
        top_k: int,
        world_size: int | None = None,
        meta: dict[str, Any] | None = None,
        keep_before_step: int | None = None,
    ) -> None:
        for name, value in (("num_experts", num_experts), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts={num_experts}, got {top_k}")
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
            kept = existing.records
            if keep_before_step is not None:
                kept = [r for r in kept if r.step < keep_before_step]
            if existing.truncated or len(kept) < len(existing.records):
                self._rewrite(existing, kept)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open(self.path, "a")
        if fresh:
            self._file.write(_header_line(num_experts, top_k, world_size, meta))
            self._file.flush()

    def _rewrite(self, trace: RoutingTrace, records: list[TraceRecord]) -> None:
        """Replace the file by its header and ``records`` (atomically: a temporary file, renamed)."""
        partial = self.path.with_name(".partial-" + self.path.name)  # keeps the .gz ending
        with _open(partial, "w") as file:
            file.write(_header_line(trace.num_experts, trace.top_k, trace.world_size, trace.meta))
            for record in records:
                file.write(_record_line(record))
        os.replace(partial, self.path)

    def write(
        self,
        step: int,
        layer: str,
        counts: Sequence[int],
        tokens: int | None = None,
        counts_per_rank: Sequence[Sequence[int]] | None = None,
        *,
        experts_per_token: Sequence[int] | None = None,
        flush: bool = True,
    ) -> None:
        """Append one record; ``tokens`` defaults to ``sum(counts) / top_k``.

        ``experts_per_token``: the step's histogram of routed experts per token (a
        per-token number of experts; see the module docstring). Raises ``ValueError``
        when the counts cannot be one step's routing (wrong length, negative, a sum
        other than ``tokens * top_k`` or the histogram's). A count over ``tokens`` is
        accepted here (hand-made loads), but cannot be replayed in a layer.
        ``flush=False`` leaves the line buffered (call ``flush()`` after the step's last record).
        """
        values = [int(c) for c in counts]
        hist = None if experts_per_token is None else tuple(int(h) for h in experts_per_token)
        tokens = check_counts(
            values, self.num_experts, self.top_k, tokens, distinct=False, experts_per_token=hist
        )
        per_rank = None
        if counts_per_rank is not None:
            per_rank = tuple(tuple(int(c) for c in row) for row in counts_per_rank)
        record = TraceRecord(int(step), str(layer), tokens, tuple(values), per_rank, hist)
        self._file.write(_record_line(record))
        if flush:
            self._file.flush()

    def flush(self) -> None:
        """Hand the written lines to the operating system (a crash after this keeps them)."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

    def __enter__(self) -> RoutingTraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines(file: IO[str]) -> Iterator[tuple[str, bool]]:
    """``(line, complete)`` pairs; a gzip stream cut short just ends (``complete=False`` last)."""
    try:
        for line in file:
            yield line, line.endswith("\n")
    except (EOFError, zlib.error, gzip.BadGzipFile):
        # The writer flushes the compressor after each step, so everything before the
        # cut decompresses; only the stream's end marker is missing.
        yield "", False


def read_routing_trace(path: str | Path) -> RoutingTrace:
    """Read a trace file; raises ``ValueError`` on a bad header or record.

    A file cut short by a crash (a partial last line, an unfinished gzip stream)
    reads as its complete records with ``truncated=True``.
    """
    path = Path(path)
    trace: RoutingTrace | None = None
    with _open(path, "r") as file:
        for number, (line, complete) in enumerate(_lines(file), 1):
            if not complete:
                if trace is not None:
                    trace.truncated = True
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
            if trace is None:
                if not isinstance(item, dict) or item.get("format") != TRACE_FORMAT:
                    break
                trace = RoutingTrace(
                    num_experts=int(item["num_experts"]),
                    top_k=int(item["top_k"]),
                    world_size=item.get("world_size"),
                    meta=dict(item.get("meta", {})),
                )
                continue
            trace.records.append(_parse_record(item, trace, f"{path}:{number}"))
    if trace is None:
        raise ValueError(f"{path}: not a flexmoe routing trace (no {TRACE_FORMAT!r} header line)")
    return trace


def _parse_record(item: dict[str, Any], trace: RoutingTrace, where: str) -> TraceRecord:
    try:
        counts = tuple(int(c) for c in item["counts"])
        per_rank = item.get("counts_per_rank")
        hist = item.get("experts_per_token")
        record = TraceRecord(
            step=int(item["step"]),
            layer=str(item["layer"]),
            tokens=int(item["tokens"]),
            counts=counts,
            counts_per_rank=None if per_rank is None else tuple(tuple(int(c) for c in r) for r in per_rank),
            experts_per_token=None if hist is None else tuple(int(h) for h in hist),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a trace record ({error!r})") from error
    if len(counts) != trace.num_experts:
        raise ValueError(
            f"{where}: step {record.step} layer {record.layer!r} has {len(counts)} counts, "
            f"the header says {trace.num_experts} experts"
        )
    if record.experts_per_token is not None and len(record.experts_per_token) != trace.top_k + 1:
        raise ValueError(
            f"{where}: step {record.step} layer {record.layer!r} has {len(record.experts_per_token)} "
            f"experts_per_token entries, the header says top_k={trace.top_k} ({trace.top_k + 1} expected)"
        )
    return record
