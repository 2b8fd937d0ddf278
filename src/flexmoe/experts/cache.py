"""A byte-budgeted cache of expert weights read from storage on demand, with prefetching (ExpertFlow).

Legend: D model dim, F expert hidden dim, H first-projection width (2F gated, else F),
L layers.

Entries are keyed ``(layer, expert)``; each holds one expert's ``(w_in [H, D], w_out
[D, F])``. The budget counts every entry, including those whose read is still in
flight (their bytes are reserved before the read starts), so the cache never holds
more than ``budget_bytes`` whatever the thread timing. An evicted expert is only
dropped: a store that recycles memory (``SafetensorsExpertStore``) reads later experts
into its buffers once nothing holds them any more, neither the cache nor a caller it
served them to.

A layer asks for its active experts with ``use(layer, experts)``: resident experts
come first, misses are read ahead by the I/O thread as far as the budget allows, and
each expert is yielded once, pinned while the caller computes with it. A layer that
needs more experts than fit at once (a long prefill) therefore reads each of them
once, in groups. ``prefetch(layer, experts)`` records a prediction of what a later
layer will use (ExpertFlow; ``flexmoe.layer.offloaded`` applies the layer's router to
the hidden states before it) and reads it in the background; the prediction's
precision and recall are scored when that layer runs.

Eviction (``policy``):

- ``"predictive"`` (default): the prediction first, then recency. An expert of a layer
  whose prediction left it out goes first (the prediction says that layer will not use
  it next), then the others in least-recently-used order; an expert predicted for a
  layer that has not run yet goes last. A prediction is the best guess at what its layer
  will use, while the experts of layers not predicted yet are only guessed by recency.
- ``"lru"``: the least recently used expert.
- ``"lfu"``: the least frequently used expert (ties: least recently used).

Under every policy a prefetch never evicts a predicted expert (it only takes the room
the eviction order yields from the others), and nothing evicts an expert in use or one
the running layer has yet to use. A prefetched expert that was never used counts as
used longest ago.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, fields
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

from flexmoe.experts.int8 import Int8Weight
from flexmoe.experts.packed import PackedWeight
from flexmoe.threads import one_thread_worker

__all__ = [
    "POLICIES",
    "CacheStats",
    "ConvertingStore",
    "ExpertCache",
    "ExpertKey",
    "ExpertStore",
    "ExpertWeights",
    "Policy",
]

ExpertKey = tuple[int, int]  # (layer, expert)
# (w_in [H, D], w_out [D, F]): in the model's dtype, int8 with per-output-channel scales,
# or packed by oneDNN
ExpertWeights = tuple[Tensor, Tensor] | tuple[Int8Weight, Int8Weight] | tuple[PackedWeight, PackedWeight]
Policy = Literal["predictive", "lru", "lfu"]
POLICIES: tuple[str, ...] = ("predictive", "lru", "lfu")


class ExpertStore(Protocol):
    """Where expert weights come from: their size, and a (blocking, thread-safe) read."""

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes the expert's weights take once read (in the dtype ``read`` returns)."""
        ...

    def read(self, key: ExpertKey) -> ExpertWeights:
        """The expert's ``(w_in [H, D], w_out [D, F])``.

        The caller may hold them as long as it likes: a store may reuse their memory
        only once they are garbage.
        """
        ...


@runtime_checkable
class ConvertingStore(ExpertStore, Protocol):
    """A store whose ``read`` is a read from storage then compute (packing the weights).

    The cache's I/O threads call ``read_stored`` (the read alone); the thread that uses
    the expert then calls ``convert``. On a CPU whose cores all run the model's own
    operations, compute on a background thread only takes them from it.
    """

    def read_stored(self, key: ExpertKey) -> ExpertWeights:
        """The expert's weights as stored, for ``convert`` (blocking, thread-safe)."""
        ...

    def convert(self, stored: ExpertWeights) -> ExpertWeights:
        """``read_stored``'s result as ``read`` would have returned it."""
        ...


@dataclass(frozen=True)
class CacheStats:
    """What an ``ExpertCache`` did since it was built (or since ``reset_stats``).

    Attributes:
        budget_bytes: the budget (``None``: unlimited).
        lookups: experts layers asked for; ``hits`` were resident, ``misses`` were not
            (``hits + misses == lookups``). A miss whose read a prefetch had already
            started counts in ``late_prefetches`` too.
        reads, bytes_read: experts read from storage and their bytes (demand and prefetch).
        prefetch_reads: reads done for ``prefetch`` (a prediction); ``prefetch_used`` of
            them were used before being evicted.
        evictions: experts dropped to make room.
        predicted: experts predicted for layers that then ran (summed over predictions);
            ``predicted_used`` of them were used by that layer; ``used_after_prediction``
            experts those layers used in all.
        resident_bytes: bytes held now (reads in flight included); ``peak_resident_bytes``
            the most ever held.
    """

    budget_bytes: int | None
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    late_prefetches: int = 0
    reads: int = 0
    bytes_read: int = 0
    prefetch_reads: int = 0
    prefetch_used: int = 0
    evictions: int = 0
    predicted: int = 0
    predicted_used: int = 0
    used_after_prediction: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / lookups`` (0 before any lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Of the experts predicted for a layer, the fraction that layer used (0 without predictions)."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def prefetch_use_rate(self) -> float:
        """Of the experts read for predictions, the fraction a layer used before eviction (0 without)."""
        return self.prefetch_used / self.prefetch_reads if self.prefetch_reads else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the experts a predicted layer used, the fraction that was predicted (0 without predictions)."""
        return self.predicted_used / self.used_after_prediction if self.used_after_prediction else 0.0


# the CacheStats fields an ExpertCache counts up (the others: the budget, the bytes held)
_COUNTED = tuple(
    f.name
    for f in fields(CacheStats)
    if f.name not in ("budget_bytes", "resident_bytes", "peak_resident_bytes")
)


@dataclass
class _Entry:
    nbytes: int
    weights: ExpertWeights | None = None  # None while its read is in flight
    converted: bool = True  # False: read by an I/O thread with ``read_stored``, not converted yet
    in_background: bool = False  # read by the I/O thread (else by the thread that needs it)
    pins: int = 0
    uses: int = 0
    last_use: int = 0
    prefetched: bool = False  # read ahead for a prediction and not used yet


class ExpertCache:
    """Expert weights read on demand into at most ``budget_bytes``, with an I/O thread for prefetches.

    Args:
        store: where the weights come from (``nbytes`` and ``read``).
        num_layers: ``L``, the number of layers whose experts it caches (layer ids ``0..L-1``,
            in the order they run).
        budget_bytes: the most bytes held at once (``None``: unlimited). It must hold at
            least one expert; callers check their own larger minimum.
        policy: ``"predictive"``, ``"lru"`` or ``"lfu"`` (see the module docstring).
        prefetch: read misses and predictions on background I/O threads (else every read
            happens when a layer needs it, and predictions are only scored).
        io_threads: how many reads run at once in the background (storage serves several
            outstanding reads faster than one after another).
    """

    def __init__(
        self,
        store: ExpertStore,
        num_layers: int,
        budget_bytes: int | None = None,
        policy: Policy = "predictive",
        prefetch: bool = True,
        io_threads: int = 4,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not (isinstance(io_threads, int) and not isinstance(io_threads, bool) and io_threads >= 1):
            raise ValueError(f"io_threads must be an int >= 1, got {io_threads!r}")
        if not (isinstance(num_layers, int) and num_layers >= 1):
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if budget_bytes is not None and not (isinstance(budget_bytes, int) and budget_bytes > 0):
            raise ValueError(f"budget_bytes must be a positive int or None, got {budget_bytes!r}")
        self.store = store
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self.policy = policy
        self._cond = threading.Condition()
        self._entries: dict[ExpertKey, _Entry] = {}
        self._needed: set[ExpertKey] = set()  # the running layer's experts not yet served
        self._predicted: dict[int, set[int]] = {}
        self._pending: list[ExpertKey] = []  # predicted experts waiting for room to be prefetched
        self._tick = 0
        self._held = 0
        self._peak = 0  # the most held since the statistics started
        # counted as plain ints (a decode step counts on every layer); `stats` builds the snapshot
        self._counts = dict.fromkeys(_COUNTED, 0)
        self._executor: ThreadPoolExecutor | None = None
        if prefetch:
            self._executor = ThreadPoolExecutor(
                max_workers=io_threads, thread_name_prefix="flexmoe-expert-io", initializer=one_thread_worker
            )
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> CacheStats:
        """A snapshot of the statistics."""
        with self._cond:
            return CacheStats(
                self.budget_bytes, **self._counts, resident_bytes=self._held, peak_resident_bytes=self._peak
            )

    def reset_stats(self) -> None:
        """Start the statistics afresh (the cache's contents stay)."""
        with self._cond:
            self._counts = dict.fromkeys(_COUNTED, 0)
            self._peak = self._held

    def resident(self) -> set[ExpertKey]:
        """The keys held now (reads in flight included)."""
        with self._cond:
            return set(self._entries)

    def wait_for_reads(self) -> None:
        """Block until no read is in flight (the prefetches queued so far have landed or failed)."""
        with self._cond:
            self._cond.wait_for(lambda: all(e.weights is not None for e in self._entries.values()))

    def close(self) -> None:
        """Stop the I/O thread (waiting for the read in progress); the cache then reads on demand only."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._cond:  # reads that never started give their reservations back
            for key in [k for k, e in self._entries.items() if e.weights is None and e.in_background]:
                self._drop(key)
            self._cond.notify_all()

    def use(self, layer: int, experts: Sequence[int]) -> Generator[tuple[int, ExpertWeights], None, None]:
        """Yield ``(expert, weights)`` once for each of ``experts`` of ``layer``, resident ones first.

        Each expert stays pinned (never evicted) until the caller asks for the next one.
        The misses start reading at once (in the background, as far as the budget allows
        without evicting experts this call still needs), before the first expert is
        yielded. Use one call at a time, from one thread.
        """
        order, _ = self._begin_use(layer, experts)
        return self._serve(order)

    def use_groups(
        self, layer: int, experts: Sequence[int]
    ) -> Generator[list[tuple[int, ExpertWeights]], None, None]:
        """``use``, with the experts resident at the call yielded first, together, in one list.

        Then each of the others alone, in a list of one, as its weights arrive. The
        experts of a list stay pinned until the caller asks for the next list: a decode
        step computes all its resident experts in one call.
        """
        order, landed = self._begin_use(layer, experts)
        groups = [order[:landed]] if landed else []
        return self._serve_groups(groups + [[key] for key in order[landed:]])

    def _begin_use(self, layer: int, experts: Sequence[int]) -> tuple[list[ExpertKey], int]:
        """Score the prediction, count, start the misses' reads: the keys to serve, how many landed."""
        keys = [(layer, int(e)) for e in dict.fromkeys(experts)]
        with self._cond:
            self._score_prediction(layer, [key[1] for key in keys])
            if self._pending:
                self._pending = [key for key in self._pending if key[0] != layer]  # needed now, or not at all
            order = [key for key in keys if self._landed(key)]
            landed = len(order)
            late = sum(1 for key in keys if key in self._entries) - landed
            self._count(lookups=len(keys), hits=landed, misses=len(keys) - landed, late_prefetches=late)
            self._needed = set(keys)
            if landed < len(keys):
                for key in keys:
                    if key not in self._entries and not self._start_background_read(key, prefetched=False):
                        break
                # resident first (no read lands while the lock is held, and none of these is
                # evicted: they are needed), then those being read, then the rest (read when reached)
                waiting = [key for key in keys if not self._landed(key)]
                order += [key for key in waiting if key in self._entries]
                order += [key for key in waiting if key not in self._entries]
        return order, landed

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Record that ``layer`` is predicted to use ``experts`` and read them in the background.

        The prediction replaces any earlier one for ``layer`` and is scored (precision,
        recall) when ``layer`` runs. Reads stop at the first expert for which no room
        can be made without evicting a predicted expert, one in use or one the running
        layer has yet to use.
        """
        wanted = [int(e) for e in dict.fromkeys(experts)]
        with self._cond:
            self._predicted[layer] = set(wanted)
            self._pending = [(layer, e) for e in wanted] if self._executor is not None else []
            self._continue_prefetch()

    # ---------------------------------------------------------------- internals
    def _continue_prefetch(self) -> None:
        """Start the pending prefetch reads until one finds no room (lock held)."""
        while self._pending:
            key = self._pending[0]
            if key not in self._entries and not self._start_background_read(key, prefetched=True):
                return
            self._pending.pop(0)

    def _serve(self, order: list[ExpertKey]) -> Generator[tuple[int, ExpertWeights], None, None]:
        with closing(self._serve_groups([[key] for key in order])) as groups:
            for (served,) in groups:
                yield served

    def _serve_groups(
        self, groups: list[list[ExpertKey]]
    ) -> Generator[list[tuple[int, ExpertWeights]], None, None]:
        try:
            for group in groups:
                served: list[tuple[ExpertKey, ExpertWeights]] = []
                try:
                    served += self._acquire_resident(group)
                    for key in group[len(served) :]:
                        served.append((key, self._acquire(key)))
                    yield [(key[1], weights) for key, weights in served]
                finally:
                    with self._cond:
                        for key, _ in served:
                            self._entries[key].pins -= 1
                            self._needed.discard(key)
                        self._continue_prefetch()  # the served experts may make room for them
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._needed.clear()

    def _acquire_resident(self, keys: list[ExpertKey]) -> list[tuple[ExpertKey, ExpertWeights]]:
        """``_acquire`` of the leading ``keys`` that are resident and ready, under one hold of the lock."""
        acquired = []
        with self._cond:
            prefetch_used = 0
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.weights is None or not entry.converted:
                    break
                prefetch_used += self._pin(entry)
                acquired.append((key, entry.weights))
            if prefetch_used:
                self._count(prefetch_used=prefetch_used)
        return acquired

    def _pin(self, entry: _Entry) -> bool:
        """Pin a resident entry and count its use (lock held); whether a prefetch read it for this use."""
        self._tick += 1
        entry.pins += 1
        entry.uses += 1
        entry.last_use = self._tick
        prefetched, entry.prefetched = entry.prefetched, False
        return prefetched

    def _acquire(self, key: ExpertKey) -> ExpertWeights:
        """The weights of ``key``, pinned: resident, waited for, or read here."""
        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is not None and entry.weights is not None:
                    if self._pin(entry):
                        self._count(prefetch_used=1)
                    if entry.converted:
                        return entry.weights
                    break
                if entry is None and self._reserve(key, demand=True):
                    break
                if entry is None and not any(e.weights is None for e in self._entries.values()):
                    held = sorted(k for k, e in self._entries.items() if e.pins or k in self._needed)
                    raise RuntimeError(
                        f"no room for expert {key[1]} of layer {key[0]} in the expert budget of "
                        f"{self.budget_bytes} bytes: every held expert is in use ({held})"
                    )
                self._cond.wait()  # its read lands, or a read in flight lands and can be evicted
        if entry is not None:  # landed from an I/O thread, pinned above: convert it here
            weights = self._convert(entry.weights)
            with self._cond:
                entry.weights, entry.converted = weights, True
            return weights
        self._read_into(key)  # reserved above; a failed read gives the room back and raises
        return self._acquire(key)

    def _convert(self, stored: ExpertWeights | None) -> ExpertWeights:
        assert stored is not None and isinstance(self.store, ConvertingStore)
        return self.store.convert(stored)

    def _start_background_read(self, key: ExpertKey, prefetched: bool) -> bool:
        """Reserve room for ``key`` and queue its read on the I/O thread (lock held); False if no room."""
        if self._executor is None or not self._reserve(key, demand=False):
            return False
        entry = self._entries[key]
        entry.in_background = True
        entry.prefetched = prefetched
        self._executor.submit(self._read_into, key, False, True)
        return True

    def _read_into(self, key: ExpertKey, raise_errors: bool = True, background: bool = False) -> None:
        """Read ``key`` into its reserved entry (no lock held while reading).

        ``background``: on an I/O thread, which leaves a ``ConvertingStore``'s conversion
        to the thread that uses the expert.
        """
        store = self.store
        if background and isinstance(store, ConvertingStore):
            read, stored_only = store.read_stored, True
        else:
            read, stored_only = store.read, False
        try:
            weights = read(key)
        except BaseException:
            with self._cond:
                self._drop(key)
                self._cond.notify_all()
            if raise_errors:
                raise
            return  # a failed prefetch: whoever needs the expert reads it again and sees the error
        with self._cond:
            entry = self._entries.get(key)
            if entry is not None:
                entry.weights, entry.converted = weights, not stored_only
                self._count(reads=1, bytes_read=entry.nbytes, prefetch_reads=int(entry.prefetched))
            self._cond.notify_all()

    def _reserve(self, key: ExpertKey, demand: bool) -> bool:
        """Make room for ``key`` and hold its bytes (lock held); False where the policy finds no room."""
        nbytes = self.store.nbytes(key)
        budget = self.budget_bytes
        if budget is not None and nbytes > budget:
            raise RuntimeError(
                f"expert {key[1]} of layer {key[0]} takes {nbytes} bytes, more than the whole "
                f"expert budget of {budget} bytes"
            )
        if budget is not None and self._held + nbytes > budget:
            # the fewest victims, in the policy's order; none are evicted unless they make room
            victims, freed = [], 0
            for victim in self._eviction_order(demand):
                if self._held - freed + nbytes <= budget:
                    break
                victims.append(victim)
                freed += self._entries[victim].nbytes
            if self._held - freed + nbytes > budget:
                return False
            for victim in victims:
                self._drop(victim)
            self._count(evictions=len(victims))
        self._entries[key] = _Entry(nbytes)
        self._held += nbytes
        self._peak = max(self._peak, self._held)
        return True

    def _eviction_order(self, demand: bool) -> list[ExpertKey]:
        """The entries that may be evicted (for a demand read, else a prefetch), first victim first.

        Never a pinned expert, one still being read, or one the running layer has yet
        to use; a prefetch never evicts a predicted expert either.
        """
        entries, predicted = self._entries, self._predicted
        candidates = [
            key
            for key, entry in entries.items()
            if entry.weights is not None and entry.pins == 0 and key not in self._needed
        ]
        if not demand:
            candidates = [key for key in candidates if key[1] not in predicted.get(key[0], ())]
        if self.policy == "lru":
            return sorted(candidates, key=lambda k: entries[k].last_use)
        if self.policy == "lfu":
            return sorted(candidates, key=lambda k: (entries[k].uses, entries[k].last_use))
        return sorted(candidates, key=lambda k: (self._prediction_rank(k), entries[k].last_use))

    def _prediction_rank(self, key: ExpertKey) -> int:
        """0: its layer's prediction left it out; 1: its layer has no prediction; 2: predicted."""
        predicted = self._predicted.get(key[0])
        if predicted is None:
            return 1
        return 2 if key[1] in predicted else 0

    def _drop(self, key: ExpertKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._held -= entry.nbytes

    def _landed(self, key: ExpertKey) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.weights is not None

    def _score_prediction(self, layer: int, used: list[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        right = len(predicted.intersection(used))
        self._count(predicted=len(predicted), predicted_used=right, used_after_prediction=len(used))

    def _count(self, **increments: int) -> None:
        counts = self._counts
        for name, n in increments.items():
            counts[name] += n
