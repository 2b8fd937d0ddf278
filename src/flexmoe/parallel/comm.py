"""Communication for expert parallelism: all-to-all exchanges (flat and 2DH) and weight gathers.

Every collective the layer issues goes through a ``Communicator``: one background
thread per layer that runs the collectives in submission order (so every rank issues
them in the same order) while the caller's thread computes — this is how the
pipelined exchange overlaps communication with expert GEMMs on every backend, gloo
included. Waiting on a collective is bounded by the layer's timeout, and a timeout
error names the layer, the step and the collective.

Legend: W ranks in the group, L ranks per node, M[q][p] rows that rank q sends to rank p.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from flexmoe.threads import one_thread_worker
from flexmoe.workspace import WORKSPACE

__all__ = [
    "TRAFFIC",
    "CollectiveTimeoutError",
    "Communicator",
    "Traffic",
    "all_gather_rows",
    "all_to_all",
    "exchange",
    "exchange_2dh",
    "gather_index",
    "reduce_scatter_rows",
]

T = TypeVar("T")


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the layer's timeout."""


class Traffic:
    """Bytes and messages this process has sent to other ranks through ``all_to_all``."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.messages = 0

    def reset(self) -> None:
        """Start counting from zero."""
        self.bytes_sent = 0
        self.messages = 0


TRAFFIC = Traffic()


def all_to_all(x: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: Any) -> Tensor:
    """Blocking variable-size all-to-all of rows: ``send_splits[p]`` rows of ``x`` go to rank ``p``."""
    me = dist.get_rank(group)
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    TRAFFIC.bytes_sent += row_bytes * (sum(send_splits) - send_splits[me])
    TRAFFIC.messages += sum(1 for p, n in enumerate(send_splits) if n and p != me)
    out = WORKSPACE.take((sum(recv_splits), *x.shape[1:]), x.dtype, x.device)
    dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group)
    return out


def all_gather_rows(x: Tensor, group: Any) -> Tensor:
    """Blocking all-gather along dim 0: every rank's ``x`` (same shape), in rank order.

    On gloo an all-to-all moves the bytes several times faster than its all-gather
    (16 MiB over loopback: 9 ms against 55 ms), so gloo sends ``x`` to every other
    rank by all-to-all; other backends use their all-gather.
    """
    W, me = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0]
    TRAFFIC.bytes_sent += x.numel() * x.element_size() * (W - 1)
    TRAFFIC.messages += W - 1
    out = x.new_empty((W * n, *x.shape[1:]))
    x = x.contiguous()
    if dist.get_backend(group) != "gloo":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x, group=group)
        return out
    if W == 2:  # receive the other rank's block in place; ours is a local copy
        other = 1 - me
        splits = [n if p == other else 0 for p in range(W)]
        out[me * n : (me + 1) * n].copy_(x)
        dist.all_to_all_single(out[other * n : (other + 1) * n], x, splits, splits, group=group)
        return out
    send = x.repeat(W, *[1] * (x.dim() - 1))
    dist.all_to_all_single(out, send, [n] * W, [n] * W, group=group)
    return out


def reduce_scatter_rows(x: Tensor, group: Any) -> Tensor:
    """Blocking reduce-scatter along dim 0: rank ``p`` gets the sum of every rank's block ``p``.

    On gloo by all-to-all (see ``all_gather_rows``) and a sum; else the backend's own.
    """
    W, me = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0] // W
    TRAFFIC.bytes_sent += x[:n].numel() * x.element_size() * (W - 1)
    TRAFFIC.messages += W - 1
    x = x.contiguous()
    if dist.get_backend(group) != "gloo":
        out = x.new_empty((n, *x.shape[1:]))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, x, group=group)
        return out
    if W == 2:  # send the other rank's block; add what it sends for ours
        other = 1 - me
        splits = [n if p == other else 0 for p in range(W)]
        got = WORKSPACE.take((n, *x.shape[1:]), x.dtype, x.device)
        dist.all_to_all_single(got, x[other * n : (other + 1) * n], splits, splits, group=group)
        total = x[me * n : (me + 1) * n] + got
    else:
        got = WORKSPACE.take(tuple(x.shape), x.dtype, x.device)
        dist.all_to_all_single(got, x, [n] * W, [n] * W, group=group)
        total = got.view(W, n, *x.shape[1:]).sum(0)
    WORKSPACE.give(got)
    return total


def gather_index(starts: Sequence[int], lengths: Sequence[int], device: torch.device) -> Tensor:
    """Concatenation of ``arange(start, start + length)`` over the segments, as one index tensor."""
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    total = int(lengths_t.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    starts_t = torch.tensor(starts, dtype=torch.int64)
    seg_begin = torch.cumsum(lengths_t, 0) - lengths_t
    index = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(starts_t - seg_begin, lengths_t)
    return index.to(device)


def exchange(
    x: Tensor, matrix: Sequence[Sequence[int]], rank: int, algorithm: str, ranks_per_node: int, group: Any
) -> Tensor:
    """Exchange rows by ``matrix``: ``matrix[q][p]`` rows go from rank ``q`` to rank ``p``.

    ``x`` holds this rank's rows ordered by destination; the result holds the received
    rows ordered by source.
    """
    if algorithm == "2dh":
        return exchange_2dh(x, matrix, rank, ranks_per_node, group)
    W = len(matrix)
    return all_to_all(x, matrix[rank], [matrix[q][rank] for q in range(W)], group)


def exchange_2dh(x: Tensor, matrix: Sequence[Sequence[int]], rank: int, L: int, group: Any) -> Tensor:
    """Hierarchical (2DH) all-to-all: aggregate inside the node, then one exchange across nodes.

    Same result as the flat exchange. Phase 1 sends, to each rank of this node with
    local index ``l'``, everything this rank has for local index ``l'`` on *any* node;
    a stride copy regroups what arrived by destination node; phase 2 sends one
    aggregated message per node, to the rank with this rank's local index there. Each
    phase is an all-to-all whose only non-empty messages stay inside a node (phase 1)
    or go between same-local-index ranks (phase 2), so a rank sends ``L - 1`` plus
    ``nodes - 1`` messages instead of ``W - 1``, each ``L`` times larger on average
    (Tutel's 2DH, with a corrected stride index: blocks are regrouped by destination node).
    """
    W = len(matrix)
    nodes = W // L
    node, local = divmod(rank, L)

    def block_index(sizes: list[int], order: list[int]) -> Tensor:
        offsets = [0] * len(sizes)
        acc = 0
        for i, s in enumerate(sizes):
            offsets[i] = acc
            acc += s
        return gather_index([offsets[i] for i in order], [sizes[i] for i in order], x.device)

    # Phase 1: regroup my send blocks from (dest node, dest local) to (dest local, dest node).
    mine = list(matrix[rank])
    order1 = [n2 * L + l2 for l2 in range(L) for n2 in range(nodes)]
    send1 = x.index_select(0, block_index(mine, order1))
    send_splits1 = [0] * W
    for l2 in range(L):
        send_splits1[node * L + l2] = sum(mine[n2 * L + l2] for n2 in range(nodes))
    recv_splits1 = [0] * W
    # What arrives from (node, l): its blocks for (n2, my local), ordered by n2.
    arrived_sizes: list[int] = []  # index (l, n2)
    for l1 in range(L):
        src = node * L + l1
        sizes = [matrix[src][n2 * L + local] for n2 in range(nodes)]
        recv_splits1[src] = sum(sizes)
        arrived_sizes.extend(sizes)
    recv1 = all_to_all(send1, send_splits1, recv_splits1, group)
    # Stride copy: (source local l, dest node n2) -> (dest node n2, source local l).
    order2 = [l1 * nodes + n2 for n2 in range(nodes) for l1 in range(L)]
    send2 = recv1.index_select(0, block_index(arrived_sizes, order2))
    send_splits2 = [0] * W
    for n2 in range(nodes):
        send_splits2[n2 * L + local] = sum(arrived_sizes[l1 * nodes + n2] for l1 in range(L))
    recv_splits2 = [0] * W
    for n1 in range(nodes):
        recv_splits2[n1 * L + local] = sum(matrix[n1 * L + l1][rank] for l1 in range(L))
    # Phase 2 delivers, from each node n1, the rows of its sources (n1, 0..L-1): source order.
    return all_to_all(send2, send_splits2, recv_splits2, group)


class Communicator:
    """Runs a layer's collectives on one background thread, in submission order, with a timeout.

    Args:
        group: the process group.
        name: the layer's name, used in error messages.
        timeout: seconds to wait for any one collective (``None``: wait forever).
    """

    def __init__(self, group: Any, name: str, timeout: float | None) -> None:
        self.group = group
        self.name = name
        self.timeout = timeout
        self.step = 0
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="flexmoe-comm", initializer=one_thread_worker
                )
            return self._executor

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` (a collective) behind the ones already submitted."""
        grad_mode = torch.is_grad_enabled()

        def run() -> T:
            with torch.set_grad_enabled(grad_mode):
                return fn(*args)

        return self._pool().submit(run)

    def wait(self, future: Future[T], what: str) -> T:
        """The result of a submitted collective; raises ``CollectiveTimeoutError`` naming it."""
        timed_out = CollectiveTimeoutError(
            f"MoELayer {self.name!r} step {self.step}: {what} did not complete within "
            f"{self.timeout} s (is every rank running the same layers with the same plan?)"
        )
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            raise timed_out from None
        except RuntimeError as error:
            # the backend's own timeout (gloo's equals the layer's) may fire first: the same failure
            if "timed out" in str(error).lower():
                raise timed_out from error
            raise RuntimeError(f"MoELayer {self.name!r} step {self.step}: {what} failed: {error}") from error

    def run(self, fn: Callable[..., T], what: str, *args: Any) -> T:
        """Submit and wait."""
        return self.wait(self.submit(fn, *args), what)

    def close(self) -> None:
        """Stop the background thread (pending collectives still run)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "a distributed MoELayer cannot be pickled or deep-copied; save its state_dict instead"
        )
