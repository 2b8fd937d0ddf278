"""The cost model's primitives: GEMMs, streaming kernels, all-to-alls, gathers, pipelines.

Every function is a pure formula of typed inputs; ``simulate`` composes them into a
plan's step. Time of one rank, in seconds:

- GEMM ``[m, k] @ [k, n]``: ``max(2(m + m_half)kn / rate, (mk + kn + mn) * b / stream) + op``
  (a roofline: compute-bound or memory-bound, plus the kernel's fixed cost; ``m_half``
  is the device's ``gemm_half_rows``, 0 for the GPU presets).
- streaming kernel over ``bytes``: ``bytes / stream + op``.
- a message of ``n`` bytes over a link: ``latency + n / bandwidth``; a rank's messages
  on one link kind are serial, the two kinds (intra-, inter-node) run in parallel, and
  a link is full duplex (sending and receiving overlap), so an all-to-all phase costs
  ``max over ranks and link kinds of (messages * latency + max(out, in) / bandwidth)``.
- flat all-to-all: one phase, ``W - 1`` messages per rank.
- 2DH all-to-all (Tutel's Alg. 2, ``flexmoe.parallel.comm.exchange_2dh``): an
  intra-node phase of ``L - 1`` messages, a stride copy, and an inter-node phase of
  ``nodes - 1`` messages ``L`` times larger.

Rows per destination: ``a_R[q]`` is what every source sends rank ``q`` (sources route
alike, see ``workload``); for uniform routing the bytes per rank equal
``flexmoe.parallel.traffic.predict_traffic`` (checked by the tests).

Legend: W ranks, L ranks per node, R ranks (a vector over them), U compute units per
rank (experts or expert slices), b bytes per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flexmoe.planner.cluster import Cluster, LinkSpec

__all__ = [
    "ExchangeCost",
    "Machine",
    "all_gather_time",
    "exchange_cost",
    "gemm_time",
    "pipeline_time",
    "stream_time",
]


@dataclass(frozen=True)
class Machine:
    """A cluster as seen by ``W`` ranks: rates after sharing, and which links messages take.

    Attributes:
        cluster: the description.
        world_size: ``W``.
        ranks_per_node: ``L`` of the 2DH exchange (the physical node size, or any
            divisor of ``W`` when every rank is on one physical node).
        single_node: every rank on one physical node (every message intra-node).
        share: fraction of a device's rate each rank gets (see ``Cluster.share``).
    """

    cluster: Cluster
    world_size: int
    ranks_per_node: int
    single_node: bool
    share: float

    @classmethod
    def create(cls, cluster: Cluster, world_size: int, ranks_per_node: int | None = None) -> Machine:
        """Place ``W`` ranks: fill nodes of ``devices_per_node`` in rank order."""
        W, Lp = world_size, cluster.devices_per_node
        if not isinstance(W, int) or W < 1:
            raise ValueError(f"world_size must be an int >= 1, got {W!r}")
        single = Lp >= W
        if not single and W % Lp != 0:
            raise ValueError(f"world_size {W} must be a multiple of the cluster's devices_per_node {Lp}")
        L = (W if single else Lp) if ranks_per_node is None else ranks_per_node
        if L < 1 or W % L != 0:
            raise ValueError(f"ranks_per_node must divide the world size {W}, got {L}")
        if not single and Lp != L:
            raise ValueError(
                f"ranks_per_node={L} must equal the cluster's devices_per_node={Lp} when ranks span nodes"
            )
        return cls(cluster, W, L, single, cluster.share(min(W, Lp)))

    @property
    def ranks_per_physical_node(self) -> int:
        """Ranks sharing one physical node."""
        return self.world_size if self.single_node else self.cluster.devices_per_node

    @property
    def op(self) -> float:
        """Seconds per kernel, after sharing."""
        return self.cluster.device.op_overhead / self.share

    @property
    def stream(self) -> float:
        """Streaming bytes per second, after sharing."""
        return self.cluster.device.stream_rate * self.share

    @property
    def elementwise(self) -> float | None:
        """Transcendental elements per second, after sharing (``None``: memory-bound)."""
        rate = self.cluster.device.elementwise_rate
        return None if rate is None else rate * self.share

    def gemm_rate(self, dtype: str) -> float:
        """GEMM FLOP/s, after sharing."""
        return self.cluster.device.gemm_rate(dtype) * self.share

    def link(self, inter: bool) -> tuple[float, float]:
        """``(latency, bandwidth)`` of a message between nodes (``inter``) or inside one."""
        spec: LinkSpec = (
            self.cluster.inter_node if inter and not self.single_node else self.cluster.intra_node
        )
        # Latency is host work on both ends: a rank with a share of a core waits longer.
        return spec.latency / self.share, spec.per_device_bandwidth(self.ranks_per_physical_node)

    @property
    def collective_overhead(self) -> float:
        """Host seconds per collective call, after sharing."""
        return self.cluster.collective_overhead / self.share


def gemm_time(
    m: NDArray[np.float64] | float, k: float, n: float, b: int, machine: Machine, dtype: str
) -> NDArray[np.float64]:
    """Roofline time of ``[m, k] @ [k, n]`` (elementwise over an array of ``m``; 0 where ``m == 0``).

    The compute term runs at the device's rate for ``m + gemm_half_rows`` rows.
    """
    m = np.asarray(m, dtype=np.float64)
    flops = 2.0 * (m + machine.cluster.device.gemm_half_rows) * k * n
    moved = (m * k + k * n + m * n) * b
    t = np.maximum(flops / machine.gemm_rate(dtype), moved / machine.stream) + machine.op
    return np.where(m > 0, t, 0.0)


def stream_time(
    nbytes: NDArray[np.float64] | float,
    machine: Machine,
    ops: int = 1,
    transcendentals: NDArray[np.float64] | float = 0.0,
) -> NDArray[np.float64]:
    """Time of ``ops`` streaming kernels moving ``nbytes`` in total (0 when nothing moves).

    ``transcendentals``: elements of a SiLU/GELU-like function among them, bounded by
    the device's ``elementwise_rate`` when it has one.
    """
    nbytes = np.asarray(nbytes, dtype=np.float64)
    t = nbytes / machine.stream
    rate = machine.elementwise
    if rate is not None:
        t = np.maximum(t, np.asarray(transcendentals, dtype=np.float64) / rate)
    return np.where(nbytes > 0, t + ops * machine.op, 0.0)


def _phase(
    messages: int,
    out_bytes: NDArray[np.float64],
    in_bytes: NDArray[np.float64],
    latency: float,
    bandwidth: float,
) -> float:
    """One all-to-all phase over one link kind: the slowest rank's serial messages."""
    if messages == 0:
        return 0.0
    return messages * latency + float(np.maximum(out_bytes, in_bytes).max()) / bandwidth


@dataclass(frozen=True)
class ExchangeCost:
    """One all-to-all of rows (one direction, one chunk).

    Attributes:
        time: seconds (the slowest rank).
        messages: messages each rank sends (per phase, summed).
        mean_message_bytes: bytes per message, averaged over the busiest rank's messages.
        bytes_out: bytes the busiest sender sends (all phases).
        bytes_inter: bytes the busiest rank sends across nodes.
    """

    time: float
    messages: int
    mean_message_bytes: float
    bytes_out: float
    bytes_inter: float


def exchange_cost(
    a_R: NDArray[np.float64], row_bytes: float, machine: Machine, algorithm: str
) -> ExchangeCost:
    """All-to-all in which every source sends ``a_R[q]`` rows to rank ``q`` (self-sends are free)."""
    W, L = machine.world_size, machine.ranks_per_node
    overhead = machine.collective_overhead
    if W == 1 or float(a_R.sum()) == 0:
        return ExchangeCost(0.0, 0, 0.0, 0.0, 0.0)
    a = a_R * row_bytes
    if algorithm == "flat":
        Lp = machine.ranks_per_physical_node
        node_sum = a.reshape(W // Lp, Lp).sum(1).repeat(Lp)
        out_intra, in_intra = node_sum - a, (Lp - 1) * a
        out_inter, in_inter = a.sum() - node_sum, (W - Lp) * a
        lat_i, bw_i = machine.link(False)
        lat_e, bw_e = machine.link(True)
        t_intra = _phase(Lp - 1, out_intra, in_intra, lat_i, bw_i)
        t_inter = _phase(W - Lp, out_inter, in_inter, lat_e, bw_e)
        out = out_intra + out_inter
        busiest = int(np.argmax(out))
        return ExchangeCost(
            overhead + max(t_intra, t_inter),
            W - 1,
            float(out[busiest]) / (W - 1),
            float(out[busiest]),
            float(out_inter.max()),
        )
    if algorithm != "2dh":
        raise ValueError(f"algorithm must be 'flat' or '2dh', got {algorithm!r}")
    nodes = W // L
    grid = a.reshape(nodes, L)  # [destination node, destination local index]
    col = np.tile(grid.sum(0), nodes)  # col[p] = sum over nodes of a[(n2, local(p))]
    # Phase 1 (inside the node): to local index l', everything for (any node, l').
    out1, in1 = a.sum() - col, (L - 1) * col
    # Phase 2 (across nodes): to (n2, l), the L node-mates' rows for (n2, l).
    out2, in2 = L * (col - a), (nodes - 1) * L * a
    lat1, bw1 = machine.link(False)
    lat2, bw2 = machine.link(True)
    t1 = _phase(L - 1, out1, in1, lat1, bw1)
    t2 = _phase(nodes - 1, out2, in2, lat2, bw2)
    # Stride copies: regroup the send buffer (all rows) and what phase 1 delivered.
    copies = float(stream_time(2.0 * (a.sum() + (L * col).max()), machine, ops=2))
    out = out1 + out2
    busiest = int(np.argmax(out))
    messages = (L - 1) + (nodes - 1)
    return ExchangeCost(
        2 * overhead + t1 + copies + t2,
        messages,
        float(out[busiest]) / max(1, messages),
        float(out[busiest]),
        float(out2.max()) if not machine.single_node else 0.0,
    )


def all_gather_time(nbytes_per_rank: float, group: int, machine: Machine, spans_nodes: bool) -> float:
    """All-gather of ``nbytes_per_rank`` from each of ``group`` ranks (latency of a log-depth algorithm)."""
    if group <= 1:
        return 0.0
    latency, bandwidth = machine.link(spans_nodes)
    return (
        machine.collective_overhead
        + math.ceil(math.log2(group)) * latency
        + (group - 1) * nbytes_per_rank / bandwidth
    )


def pipeline_time(
    out_s: float, compute_s: float, back_s: float, chunks: int, overlap_efficiency: float
) -> tuple[float, float]:
    """``(time, ideal saving)`` of ``chunks`` pipelined (exchange, compute, exchange back) triples.

    Collectives run on one channel in submission order (the communicator thread, or a
    comm stream): all ``chunks`` outgoing exchanges first, then each return exchange
    once its chunk is computed. ``overlap_efficiency`` scales the saving over running
    everything in sequence (interference between communication and compute).
    """
    comm = 0.0
    arrived = []
    for _ in range(chunks):
        comm += out_s
        arrived.append(comm)
    compute_end = 0.0
    for i in range(chunks):
        compute_end = max(arrived[i], compute_end) + compute_s
        comm = max(comm, compute_end) + back_s
    sequential = chunks * (out_s + compute_s + back_s)
    saving = sequential - comm
    return sequential - overlap_efficiency * saving, saving
