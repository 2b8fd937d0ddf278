"""What the planner knows about a machine: device specs and the links between devices.

A ``Cluster`` is data: it is read from a JSON file (the presets next to this module,
or the file ``flexmoe calibrate`` writes), and every number in a preset carries its
source in the file's ``sources`` table. Units are SI throughout: seconds, bytes,
bytes per second, FLOP per second.

Links are described per device and per direction (full duplex): a device sends at
``bandwidth`` and receives at ``bandwidth`` at the same time; each message costs
``latency`` on top of its bytes. ``node_bandwidth``, when set, caps the sum over the
devices of one node (a shared medium, such as the loopback of one CPU machine).

``compute_slots_per_node`` is for machines whose ranks share compute units (CPU
processes on fewer cores than ranks): with ``n`` ranks on a node and ``c`` slots, each
rank computes, copies memory and runs its host code at ``min(1, c/n)`` of the
device's rate. GPUs have one slot per device.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "Cluster",
    "DeviceSpec",
    "LinkSpec",
    "default_calibration_path",
    "load_cluster",
    "preset_names",
]

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


def _positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _fraction(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """One kind of link (inside a node, or between nodes), per device and direction.

    Attributes:
        bandwidth: bytes per second one device sends (and, at once, receives).
        latency: seconds per message, independent of its size.
        node_bandwidth: bytes per second all devices of a node send together at most
            (``None``: no shared limit).
    """

    bandwidth: float
    latency: float
    node_bandwidth: float | None = None

    def __post_init__(self) -> None:
        _positive(self.bandwidth, "bandwidth")
        _non_negative(self.latency, "latency")
        if self.node_bandwidth is not None:
            _positive(self.node_bandwidth, "node_bandwidth")

    def per_device_bandwidth(self, senders_per_node: int) -> float:
        """Bandwidth one device gets while ``senders_per_node`` devices of its node send."""
        if self.node_bandwidth is None:
            return self.bandwidth
        return min(self.bandwidth, self.node_bandwidth / max(1, senders_per_node))


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or one CPU core running one rank).

    Attributes:
        name: what it is.
        flops: peak dense FLOP/s per dtype (``"fp32"``, ``"bf16"``, ``"fp16"``).
        gemm_efficiency: fraction of ``flops`` a large GEMM reaches.
        memory_bandwidth: peak bytes per second to device memory.
        memory_efficiency: fraction of ``memory_bandwidth`` a streaming kernel reaches.
        memory_bytes: device memory.
        op_overhead: seconds per kernel (launch, or an eager CPU op's dispatch).
        elementwise_rate: elements per second of a transcendental pointwise op (SiLU,
            GELU) when that, not memory, bounds it (CPUs); ``None``: memory-bound (GPUs).
        gemm_half_rows: rows ``m`` at which a GEMM ``[m, k] @ [k, n]`` reaches half of
            its large-``m`` rate (Hockney's n-half: packing and edge costs amortised over
            the rows); 0 when the roofline's memory term covers small GEMMs (GPUs).
        solo_speedup: how much faster one rank computes while the other ranks of its
            node are idle than while all of them compute (CPU cores share memory
            bandwidth, caches and clock headroom; 1 for accelerators). A straggler
            speeds up as the others finish (see ``flexmoe.planner.simulate``).
    """

    name: str
    flops: Mapping[str, float]
    gemm_efficiency: float
    memory_bandwidth: float
    memory_efficiency: float
    memory_bytes: float
    op_overhead: float
    elementwise_rate: float | None = None
    gemm_half_rows: float = 0.0
    solo_speedup: float = 1.0

    def __post_init__(self) -> None:
        if not self.flops:
            raise ValueError("flops must give the peak FLOP/s of at least one dtype")
        for dtype, value in self.flops.items():
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"flops keys must be among {sorted(DTYPE_BYTES)}, got {dtype!r}")
            _positive(value, f"flops[{dtype!r}]")
        _fraction(self.gemm_efficiency, "gemm_efficiency")
        _positive(self.memory_bandwidth, "memory_bandwidth")
        _fraction(self.memory_efficiency, "memory_efficiency")
        _positive(self.memory_bytes, "memory_bytes")
        _non_negative(self.op_overhead, "op_overhead")
        if self.elementwise_rate is not None:
            _positive(self.elementwise_rate, "elementwise_rate")
        _non_negative(self.gemm_half_rows, "gemm_half_rows")
        if not self.solo_speedup >= 1.0:
            raise ValueError(f"solo_speedup must be >= 1, got {self.solo_speedup!r}")

    def gemm_rate(self, dtype: str) -> float:
        """Achieved FLOP/s of a large GEMM in ``dtype``."""
        if dtype not in self.flops:
            raise ValueError(
                f"device {self.name!r} has no FLOP/s for dtype {dtype!r} (has {sorted(self.flops)})"
            )
        return self.flops[dtype] * self.gemm_efficiency

    @property
    def stream_rate(self) -> float:
        """Achieved bytes per second of a streaming (memory-bound) kernel."""
        return self.memory_bandwidth * self.memory_efficiency


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Devices, their grouping into nodes, the links, and the runtime's fixed costs.

    Attributes:
        name: preset or file name.
        device: every device's spec (the cluster is homogeneous).
        devices_per_node: ``L``: devices that share the intra-node link.
        intra_node, inter_node: the two link kinds.
        compute_slots_per_node: ranks of one node that compute at full rate at once
            (``None``: one per device; see the module docstring).
        overlap_efficiency: fraction of the communication that pipelining could hide
            that it does hide (interference between communication and compute);
            negative when running both at once is slower than one after the other
            (CPU ranks whose communication needs the cores that compute).
        collective_overhead: host seconds per collective the runtime issues (launch,
            hand-off to the communication thread), on top of the link latency.
        step_overhead: host seconds per layer step (forward and backward) that do not
            depend on the sizes (Python, autograd bookkeeping).
        chunk_overhead: host seconds per pipelined chunk and pass.
        sources: where each number comes from (field path -> citation or method).
        notes: free text.
    """

    name: str
    device: DeviceSpec
    devices_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    compute_slots_per_node: int | None = None
    overlap_efficiency: float = 1.0
    collective_overhead: float = 0.0
    step_overhead: float = 0.0
    chunk_overhead: float = 0.0
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ValueError(f"devices_per_node must be an int >= 1, got {self.devices_per_node!r}")
        if self.compute_slots_per_node is not None and (
            not isinstance(self.compute_slots_per_node, int) or self.compute_slots_per_node < 1
        ):
            raise ValueError(
                f"compute_slots_per_node must be an int >= 1 or None, got {self.compute_slots_per_node!r}"
            )
        if not -1 <= self.overlap_efficiency <= 1:
            raise ValueError(f"overlap_efficiency must be in [-1, 1], got {self.overlap_efficiency!r}")
        _non_negative(self.collective_overhead, "collective_overhead")
        _non_negative(self.step_overhead, "step_overhead")
        _non_negative(self.chunk_overhead, "chunk_overhead")

    def share(self, ranks_on_node: int) -> float:
        """Fraction of a device's rate each of ``ranks_on_node`` ranks of one node gets."""
        slots = self.compute_slots_per_node or self.devices_per_node
        return min(1.0, slots / max(1, ranks_on_node))

    def with_links(
        self, *, intra_bandwidth: float | None = None, inter_bandwidth: float | None = None
    ) -> Cluster:
        """A copy with other link bandwidths (for what-if questions and sweeps)."""
        intra, inter = self.intra_node, self.inter_node
        if intra_bandwidth is not None:
            intra = replace(intra, bandwidth=intra_bandwidth)
        if inter_bandwidth is not None:
            inter = replace(inter, bandwidth=inter_bandwidth)
        return replace(self, intra_node=intra, inter_node=inter)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what ``from_dict`` reads)."""
        data = asdict(self)
        data["device"]["flops"] = dict(self.device.flops)
        data["sources"] = dict(self.sources)
        return {"format": "flexmoe-cluster", "version": 1, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        """Read the JSON form; raises ``ValueError`` naming a missing or unknown field."""
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        if data.get("format", "flexmoe-cluster") != "flexmoe-cluster":
            raise ValueError(f"not a flexmoe cluster file (format {data.get('format')!r})")
        try:
            device = DeviceSpec(**body.pop("device"))
            intra = LinkSpec(**body.pop("intra_node"))
            inter = LinkSpec(**body.pop("inter_node"))
            return cls(device=device, intra_node=intra, inter_node=inter, **body)
        except (KeyError, TypeError) as error:
            raise ValueError(f"bad cluster description: {error}") from error

    def save(self, path: str | Path) -> Path:
        """Write the JSON form to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path


def preset_names() -> list[str]:
    """Names of the built-in presets (files ``presets/<name>.json``)."""
    folder = resources.files("flexmoe.planner") / "presets"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A built-in preset by name, ``"this-machine"`` (the calibrated file), or a JSON file path."""
    text = str(name_or_path)
    if text == "this-machine":
        path = default_calibration_path()
        if not path.exists():
            raise FileNotFoundError(
                f"no calibration at {path}: run `flexmoe calibrate` first (or pass a cluster file)"
            )
        return Cluster.from_dict(json.loads(path.read_text()))
    if text in preset_names():
        folder = resources.files("flexmoe.planner") / "presets"
        return Cluster.from_dict(json.loads((folder / f"{text}.json").read_text()))
    path = Path(text)
    if path.suffix == ".json" and path.exists():
        return Cluster.from_dict(json.loads(path.read_text()))
    raise ValueError(
        f"unknown cluster {text!r}: expected one of {[*preset_names(), 'this-machine']} or a .json file"
    )


def default_calibration_path() -> Path:
    """Where ``flexmoe calibrate`` stores this machine's description by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flexmoe" / "this-machine.json"
