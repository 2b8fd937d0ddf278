"""Pre-packed expert weights for the CPU forward without autograd (an explicit opt-in).

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection
width (2F gated, else F), P = H / F, E experts.

Decode-sized segments (a few rows per expert) are bound by how fast the experts'
weights stream from memory, and the library GEMM for a few rows falls well short of
that. Per core on a 2-core AMD EPYC (20 GB/s read bandwidth per core, about 28 GB/s
for both), ``[1536, 2048]`` fp32 weights of 128 experts:

================================  =======  =======  =======  =======
rows per expert                      1        2        4        8
================================  =======  =======  =======  =======
MKL ``x @ W^T``, ``torch.mv``     19 GB/s  10 GB/s   8 GB/s   7 GB/s
oneDNN, packed weights            16 GB/s  15 GB/s  12 GB/s   9 GB/s
================================  =======  =======  =======  =======

So a prepared module keeps a second copy of every expert's two projection matrices,
reordered once by oneDNN (``torch.ops.mkldnn._reorder_linear_weight``) into the
blocked layout its matmul reads fastest, and runs each expert's segment on the plain
weights for one fp32 row (as fast there), oneDNN's matmul on the packed copy for up to
``MAX_PACKED_ROWS`` rows (one bf16 row included), and MKL on the plain weights beyond
that (where MKL is faster again, and oneDNN would have to reorder a copy packed for few
rows): ``packed_rows`` decides, ``flexmoe.experts.backends.stacked_inference`` runs the
pass. Experts run on all cores at once (``for_each_segment``). In bf16 on a CPU where
the row kernels run (``flexmoe.experts.rows``: up to 2 rows on AVX512-BF16, up to 32 on
AMX tiles), those rows stream the plain weights instead, faster than the packed copy.

On ``benchmarks/layer.py``'s decode case (64 tokens, dim 2048, hidden 768, 128
experts, top-8, fp32, no grad) a prepared layer runs about 1.2-1.3x faster than an
unprepared one on that machine (docs/performance.md has the current numbers). Both
cores stay busy throughout: the small-row kernels, not memory bandwidth, are the limit.

The copy doubles the memory of the experts' weights, so it exists only after
``GroupedExperts.prepare_for_inference()``. A stale copy is never used: it is dropped
when the weights it was packed from change (a new version counter value from any
in-place write: ``copy_``, ``load_state_dict``, the for-loop and ``foreach`` optimizer
steps), are replaced (``.data =``, ``.to()``) or are stepped by any ``torch.optim``
optimizer (the ``fused=True`` steps write without bumping the version counter, so a
global optimizer step hook catches them); ``train()`` releases it too. Writes through
``.data`` bypass all of these and are not detected: call ``prepare_for_inference()``
again after them.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from flexmoe.experts.backends import stacked_inference
from flexmoe.experts.kernels import bf16_max_rows, decodes_plain
from flexmoe.experts.stacks import ExpertTensors

__all__ = [
    "MAX_PACKED_ROWS",
    "PackedExpertWeights",
    "PackedLinear",
    "PackedWeight",
    "packed_ffn_inference",
    "packed_inference_supported",
    "packed_linear",
    "packed_rows",
]

ROWS_HINT = 4  # the batch size oneDNN packs for: best measured for 2-16 rows (1, 8, 16 and none: no better)
MAX_PACKED_ROWS = 128  # beyond this MKL on the plain weights is as fast (and from ~256 rows, faster)


def packed_rows(rows: int, dtype: torch.dtype) -> bool:
    """Whether a product of ``rows`` rows runs on the packed weights (else the plain weights).

    Up to ``MAX_PACKED_ROWS``, from one row in bf16 (the BLAS matrix-vector product reads
    about half as fast as oneDNN's packed matmul there) and from two in fp32 (where
    ``torch.mv`` on the plain weights is as fast). Not the bf16 rows that the row kernels
    take (``flexmoe.experts.rows``: they stream the plain weights faster still).
    """
    if decodes_plain(dtype) and rows <= bf16_max_rows():
        return False
    return (1 if dtype == torch.bfloat16 else 2) <= rows <= MAX_PACKED_ROWS


def _ops_available() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight.default  # noqa: B018
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def packed_inference_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed expert weights can be built for this device and dtype.

    CPU only, with oneDNN in the PyTorch build; fp32, and bf16 where the CPU has
    native bf16 matmuls (oneDNN's own check).
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() or not _ops_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _pack(weight: Tensor) -> Tensor:
    packed: Tensor = torch.ops.mkldnn._reorder_linear_weight.default(weight.contiguous(), ROWS_HINT)
    return packed


def _linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    y: Tensor = torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")
    return y


@dataclass(frozen=True)
class PackedWeight:
    """One weight ``[O, I]`` held only as oneDNN's packed copy, for inference on the CPU.

    Packed for one row at a time (decoding): a one-row product then runs about 1.6x
    faster than the BLAS call on the plain bf16 weight, and a few hundred rows as fast.
    It holds about the bytes of the plain weight (``nbytes`` counts those).
    """

    packed: Tensor
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def pack(cls, weight: Tensor) -> PackedWeight:
        """``weight [O, I]`` packed (check ``packed_inference_supported`` first)."""
        packed: Tensor = torch.ops.mkldnn._reorder_linear_weight.default(weight.contiguous(), 1)
        return cls(packed, (int(weight.shape[0]), int(weight.shape[1])), weight.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the plain weight (the packed layout adds at most its padding)."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def packed_linear(x_NI: Tensor, weight: PackedWeight) -> Tensor:
    """``x @ w^T`` for a packed weight, in the weight's dtype: ``[N, I] -> [N, O]``."""
    if x_NI.shape[0] == 0:
        return x_NI.new_zeros(0, weight.shape[0], dtype=weight.dtype)
    return _linear(x_NI.to(weight.dtype).contiguous(), weight.packed, None)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` for inference whose weight is held only as oneDNN's packed copy.

    ``PackedLinear.of(linear)`` takes the layer's weight (and bias); the plain weight is
    then no longer needed. Inference only (no gradient reaches the weight), CPU only.
    """

    def __init__(self, weight: PackedWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.packed = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        """``linear``'s weight packed (check ``packed_inference_supported`` first)."""
        with torch.no_grad():
            return cls(PackedWeight.pack(linear.weight.detach()), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T + b`` over the last dimension of ``x``."""
        y = packed_linear(x.reshape(-1, self.in_features), self.packed)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """What ``print(model)`` shows of it."""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.packed.dtype}"


class PackedExpertWeights:
    """oneDNN-packed copies of each expert's ``w_in[e]`` and ``w_out[e]``, and their sources.

    Holds detached aliases of the weights it was packed from (sharing their storage and
    version counter), so that ``matches`` can tell whether the module's weights are
    still those, unchanged. Copying or pickling the module does not copy the packed
    weights (they are opaque oneDNN tensors): the copy's attribute is ``None``.
    """

    def __init__(self, w_in: Tensor, w_out: Tensor) -> None:
        with torch.no_grad():
            self._sources: tuple[Tensor, ...] = (w_in.detach(), w_out.detach())
            self._versions = (w_in._version, w_out._version)
            self.w_in = [_pack(w) for w in self._sources[0]]
            self.w_out = [_pack(w) for w in self._sources[1]]
        self.stale = False
        _register(self)

    def project_in(self, x_nD: Tensor, expert: int) -> Tensor | None:
        """``x @ w_in[expert]^T`` on the packed copy where it pays (``packed_rows``), else ``None``."""
        if not packed_rows(x_nD.shape[0], x_nD.dtype):
            return None
        return _linear(x_nD, self.w_in[expert], None)

    def project_out(self, a_nF: Tensor, expert: int) -> Tensor | None:
        """``a @ w_out[expert]^T`` on the packed copy where it pays (``packed_rows``), else ``None``."""
        if not packed_rows(a_nF.shape[0], a_nF.dtype):
            return None
        return _linear(a_nF, self.w_out[expert], None)

    def matches(self, w_in: Tensor, w_out: Tensor) -> bool:
        """Whether ``w_in``, ``w_out`` are the tensors packed here, unchanged since."""
        if self.stale:
            return False
        for source, weight, version in zip(self._sources, (w_in, w_out), self._versions, strict=True):
            if (
                weight._version != version
                or source._version != version
                or weight.data_ptr() != source.data_ptr()
                or weight.dtype != source.dtype
                or weight.device != source.device
                or weight.shape != source.shape
                or weight.stride() != source.stride()
            ):
                return False
        return True

    def invalidate(self) -> None:
        """Mark stale and free the packed copies (and the references to their sources)."""
        self.stale = True
        self.w_in, self.w_out = [], []
        self._sources = ()

    def shares_storage_with(self, pointers: set[int]) -> bool:
        """Whether a source weight's storage starts at one of ``pointers``."""
        return any(source.untyped_storage().data_ptr() in pointers for source in self._sources)

    def nbytes(self) -> int:
        """Bytes the packed copies hold (about those of ``w_in`` and ``w_out``)."""
        if self.stale:
            return 0
        return sum(source.numel() * source.element_size() for source in self._sources)

    def __reduce__(self) -> tuple[Any, ...]:
        # deepcopy and pickle rebuild this attribute as None (no packed copy in the copy).
        return (_nothing, ())


def _nothing() -> None:
    return None


# ---------------------------------------------------------------- invalidation on optimizer steps
_live: weakref.WeakSet[PackedExpertWeights] = weakref.WeakSet()
_live_lock = threading.Lock()
_hook_registered = False


def _register(packed: PackedExpertWeights) -> None:
    global _hook_registered
    with _live_lock:
        _live.add(packed)
        if not _hook_registered:
            register_optimizer_step_post_hook(_after_optimizer_step)
            _hook_registered = True


def _storage_pointer(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse or opaque tensors have no plain storage
        return None


def _after_optimizer_step(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Invalidate the packed weights of every parameter this optimizer just stepped."""
    with _live_lock:
        live = [packed for packed in _live if not packed.stale]
    if not live:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pointers = {pointer for pointer in map(_storage_pointer, params) if pointer is not None}
    for packed in live:
        if packed.shares_storage_with(pointers):
            packed.invalidate()


# ---------------------------------------------------------------- the forward
def packed_ffn_inference(
    x_ND: Tensor,
    counts: list[int],
    packed: PackedExpertWeights,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: str,
    row_weights_N: Tensor | None = None,
) -> Tensor:
    """The fused backend's forward without autograd, on packed weights where they pay.

    Same contract as ``grouped_ffn`` (``w * FFN_e(x)`` per row); ``packed`` must match
    ``w_in``, ``w_out`` (the caller checks). ``stacked_inference`` on one stack whose
    products are the packed copies (``packed_rows``: the plain GEMM elsewhere).
    """
    stack = ExpertTensors(w_in, w_out, b_in, b_out, packed)
    return stacked_inference(x_ND, counts, [stack], activation, row_weights_N)
