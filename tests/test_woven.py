"""The woven expert FFN (``flexmoe.adapters.woven``): every fast form against a per-row reference.

Each row ``n`` belongs to one group (its expert among the stacked experts) and possibly to
one slot of a LoRA stack of ``w_in`` and one of ``w_out`` (the rows of a slot are part of
its base expert's rows, as in a multi-adapter batch). The reference computes each row on
its own, in float64, straight from the definitions:
``h = W_in[g] x + b_in[g] + B_in[l] A_in[l] x``, ``a = w * act(h)``,
``y = W_out[g] a + w b_out[g] + B_out[l'] A_out[l'] a``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe.adapters import woven
from flexmoe.adapters.woven import Groups, LoRAPart, woven_ffn, woven_inference
from flexmoe.experts.activations import activate
from flexmoe.experts.packed import PackedExpertWeights, packed_inference_supported
from flexmoe.experts.stacks import ExpertTensors

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]
TARGETS = ("w_in", "w_out")


@dataclass
class Adapter:
    experts: list[int]
    rank: int
    targets: tuple[str, ...]


@dataclass
class Case:
    E: int
    extra: list[int]  # rows of each expert of a second stack (the ESFT experts)
    D: int
    F: int
    activation: str
    bias: bool
    adapters: list[Adapter]
    counts: list[int]  # rows per virtual expert: per base expert j, its base rows, then its slots'
    gather_threshold: int
    bag_layout: bool  # factors stored as the weave stores them (summed in place on CPU)
    bag_indices: int  # woven.BAG_INDICES: small ones take the rows in several chunks
    packed_base: bool  # the base stack's products on oneDNN-packed copies (a prepared layer's)
    lora_kernel: bool  # the CPU kernel sums LoRA terms where it takes them (else PyTorch's forms)
    seed: int


@st.composite
def cases(draw) -> Case:
    E = draw(st.integers(1, 4))
    adapters = [
        Adapter(
            experts=draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True)),
            rank=draw(st.sampled_from([1, 2, 4])),
            targets=draw(st.sampled_from([("w_in", "w_out"), ("w_in",), ("w_out",)])),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    num_slots = sum(len(a.experts) for a in adapters)
    most = draw(st.sampled_from([2, 9]))  # few rows per slot (gathered) or many (grouped GEMMs)
    return Case(
        E=E,
        extra=draw(st.lists(st.integers(0, 3), max_size=3)),
        D=draw(st.sampled_from([4, 8])),
        F=draw(st.sampled_from([4, 8])),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        adapters=adapters,
        counts=draw(st.lists(st.integers(0, most), min_size=E + num_slots, max_size=E + num_slots)),
        gather_threshold=draw(st.sampled_from([0, 1, 10**6])),  # x the defaults: never, default, always
        bag_layout=draw(st.booleans()),
        bag_indices=draw(st.sampled_from([8, woven.BAG_INDICES])),
        packed_base=draw(st.booleans()),
        lora_kernel=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class Built:
    x: torch.Tensor
    row_weights: torch.Tensor
    base: ExpertTensors
    extra: ExpertTensors
    group_counts: list[int]  # rows per base expert, then per extra expert
    group_of_row: list[int]  # into the base experts, then the extra ones
    stacks: dict[tuple[str, int], tuple[list[int], torch.Tensor, torch.Tensor]]  # rows per slot, A, B
    slot_of_row: dict[str, list[tuple[tuple[str, int], int] | None]]  # per target: (stack, slot) or None
    rows: dict[tuple[str, int], list[int]]  # each stack's rows, slot by slot


def build(case: Case) -> Built:
    """The rows in the order a multi-adapter batch has them, the experts, the LoRA stacks."""
    torch.manual_seed(case.seed)
    E, D, F = case.E, case.D, case.F
    H = 2 * F if case.activation in ("swiglu", "geglu") else F

    def experts(n: int) -> ExpertTensors:
        return ExpertTensors(
            torch.randn(n, H, D) * 0.5,
            torch.randn(n, D, F) * 0.5,
            torch.randn(n, H) if case.bias else None,
            torch.randn(n, D) if case.bias else None,
        )

    # 1. virtual experts of the main part: base expert j, then each adapter's version of j
    virtual = [(j, -1) for j in range(E)] + [(j, a) for a, ad in enumerate(case.adapters) for j in ad.experts]
    virtual.sort()
    start, starts = 0, {}
    group_of_row: list[int] = []
    for v, count in zip(virtual, case.counts, strict=True):
        starts[v] = (start, count)
        start += count
        group_of_row += [v[0]] * count
    group_counts = [
        sum(c for (j, _), c in zip(virtual, case.counts, strict=True) if j == e) for e in range(E)
    ]
    group_counts += case.extra
    for i, count in enumerate(case.extra):
        group_of_row += [E + i] * count
    N = len(group_of_row)
    # 2. one stack per (target, rank): its slots (expert, adapter) in order, their rows
    stacks: dict[tuple[str, int], tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    rows: dict[tuple[str, int], list[int]] = {}
    slot_of_row: dict[str, list[tuple[tuple[str, int], int] | None]] = {t: [None] * N for t in TARGETS}
    width = {"w_in": (D, H), "w_out": (F, D)}
    for target in TARGETS:
        ranks = sorted({ad.rank for ad in case.adapters if target in ad.targets})
        for rank in ranks:
            slots = sorted(
                (j, a)
                for a, ad in enumerate(case.adapters)
                if target in ad.targets and ad.rank == rank
                for j in ad.experts
            )
            key = (target, rank)
            width_in, width_out = width[target]
            stack_rows: list[int] = []
            for index, slot in enumerate(slots):
                s, count = starts[slot]
                stack_rows += range(s, s + count)
                for n in range(s, s + count):
                    slot_of_row[target][n] = (key, index)
            counts_L = [starts[slot][1] for slot in slots]
            A, B = torch.randn(len(slots), rank, width_in), torch.randn(len(slots), width_out, rank) * 0.5
            stacks[key] = (counts_L, *(woven.bag_layout(A, B) if case.bag_layout else (A, B)))
            rows[key] = stack_rows
    return Built(
        torch.randn(N, D),
        torch.rand(N),
        experts(E),
        experts(len(case.extra)),
        group_counts,
        group_of_row,
        stacks,
        slot_of_row,
        rows,
    )


def parts_of(built: Built, A_B: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> list[LoRAPart]:
    parts = []
    for key, (counts_L, _, _) in built.stacks.items():
        rows = built.rows[key]
        if rows:
            slots = Groups(np.array(counts_L, dtype=np.int64), torch.tensor(counts_L, dtype=torch.int64))
            parts.append(LoRAPart(key[0], torch.tensor(rows, dtype=torch.int64), slots, *A_B[key]))
    return parts


def reference(
    built: Built,
    x: torch.Tensor,
    row_weights: torch.Tensor,
    stacks: list[ExpertTensors],
    A_B: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
    activation: str,
) -> torch.Tensor:
    """Each row on its own, in float64 (differentiable in every input)."""
    flat = [(stack, e) for stack in stacks for e in range(stack.w_in.shape[0])]
    outputs = []
    for n, g in enumerate(built.group_of_row[: x.shape[0]]):  # x may hold the first rows only
        stack, e = flat[g]
        x_n, w_n = x[n].double(), row_weights[n].double()
        h = stack.w_in[e].double() @ x_n
        if stack.b_in is not None:
            h = h + stack.b_in[e].double()
        slot = built.slot_of_row["w_in"][n]
        if slot is not None:
            A, B = A_B[slot[0]]
            h = h + B[slot[1]].double() @ (A[slot[1]].double() @ x_n)
        a = activate(h[None], activation)[0] * w_n
        y = stack.w_out[e].double() @ a
        if stack.b_out is not None:
            y = y + w_n * stack.b_out[e].double()
        slot = built.slot_of_row["w_out"][n]
        if slot is not None:
            A, B = A_B[slot[0]]
            y = y + B[slot[1]].double() @ (A[slot[1]].double() @ a)
        outputs.append(y)
    return torch.stack(outputs) if outputs else x.new_zeros(0, x.shape[1]).double()


class GatherThreshold:
    """Scales the thresholds of ``woven``'s per-row LoRA forms by ``factor`` in a ``with`` block.

    ``GATHER_*_PER_SLOT`` and ``BAG_SLOT_WIDTHS`` (so that every LoRA form gets drawn);
    ``BAG_INDICES`` becomes ``bag_indices``.
    """

    NAMES = ("GATHER_ROWS_PER_SLOT", "GATHER_BYTES_PER_SLOT", "BAG_SLOT_WIDTHS")

    def __init__(self, factor: int, bag_indices: int = woven.BAG_INDICES) -> None:
        self.factor = factor
        self.bag_indices = bag_indices

    def __enter__(self) -> None:
        self.saved = [getattr(woven, name) for name in (*self.NAMES, "BAG_INDICES")]
        for name, value in zip(self.NAMES, self.saved, strict=False):
            setattr(woven, name, value * self.factor)
        woven.BAG_INDICES = self.bag_indices

    def __exit__(self, *exc: object) -> None:
        for name, value in zip((*self.NAMES, "BAG_INDICES"), self.saved, strict=True):
            setattr(woven, name, value)


@given(cases(), st.sampled_from(["loop", "fused", "grouped_mm"]))
@settings(max_examples=60, deadline=None)
def test_woven_ffn_equals_each_row_alone(case: Case, backend: str) -> None:
    built = build(case)
    n_main = sum(built.group_counts[: case.E])
    base = ExpertTensors(*(None if t is None else t.clone().requires_grad_() for t in built.base))
    A_B = {
        key: (A.clone().requires_grad_(), B.clone().requires_grad_())
        for key, (_, A, B) in built.stacks.items()
    }
    x = built.x[:n_main].clone().requires_grad_()
    row_weights = built.row_weights[:n_main].clone().requires_grad_()
    counts = np.array(built.group_counts[: case.E], dtype=np.int64)
    groups = Groups(counts, torch.from_numpy(counts))
    with GatherThreshold(case.gather_threshold, case.bag_indices):
        y = woven_ffn(x, groups, *base[:4], case.activation, row_weights, parts_of(built, A_B), backend)
    expected = reference(built, x, row_weights, [base], A_B, case.activation)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    if n_main == 0:
        return
    grad_y = torch.randn_like(y)
    leaves = [
        x,
        row_weights,
        *(t for t in base if t is not None),
        *(t for pair in A_B.values() for t in pair),
    ]
    got = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, grad_y.double(), allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4)


@given(cases())
@settings(max_examples=60, deadline=None)
def test_woven_inference_equals_each_row_alone(case: Case) -> None:
    built = build(case)
    A_B = {key: (A, B) for key, (_, A, B) in built.stacks.items()}
    base = built.base
    if case.packed_base and packed_inference_supported(base.w_in.device, base.w_in.dtype):
        base = base._replace(products=PackedExpertWeights(base.w_in, base.w_out))
    stacks = [base, built.extra] if case.extra else [base]
    kernel = (
        contextlib.nullcontext()
        if case.lora_kernel
        else mock.patch.object(woven, "takes_lora", return_value=False)
    )
    with torch.no_grad(), GatherThreshold(case.gather_threshold, case.bag_indices), kernel:
        y = woven_inference(
            built.x, built.group_counts, stacks, case.activation, built.row_weights, parts_of(built, A_B)
        )
        expected = reference(built, built.x, built.row_weights, stacks, A_B, case.activation)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_lora_terms_gather_only_slots_with_few_rows() -> None:
    wide = torch.empty(5, 8, 512), torch.empty(5, 512, 8)  # rank 8, 512 -> 512: 32 KiB per row
    few = Groups(np.array([0, 1, 0, 2, 1]), torch.tensor([0, 1, 0, 2, 1]))
    assert LoRAPart("w_in", torch.arange(4), few, *wide).gathers()  # 4 rows over 3 non-empty slots
    many = Groups(np.array([0, 3, 0, 0, 0]), torch.tensor([0, 3, 0, 0, 0]))
    assert not LoRAPart("w_in", torch.arange(3), many, *wide).gathers()
    narrow = torch.empty(5, 8, 64), torch.empty(5, 64, 8)  # 4 KiB per row: 8 rows per slot gather
    eight = Groups(np.array([0, 8, 0, 0, 0]), torch.tensor([0, 8, 0, 0, 0]))
    assert LoRAPart("w_in", torch.arange(8), eight, *narrow).gathers()
    assert not LoRAPart("w_in", torch.arange(8), eight, *wide).gathers()


def test_lora_terms_sum_in_place_while_slots_are_narrow() -> None:
    plain = torch.empty(5, 8, 512), torch.empty(5, 384, 8)  # rank 8, 512 -> 384: 896 wide
    bagged = woven.bag_layout(*plain)
    assert woven.in_bag_layout(*bagged) and not woven.in_bag_layout(*plain)
    nine = Groups(np.array([0, 9, 0, 0, 0]), torch.tensor([0, 9, 0, 0, 0]))  # 9 x 896 <= 8192
    ten = Groups(np.array([0, 10, 0, 0, 0]), torch.tensor([0, 10, 0, 0, 0]))
    assert LoRAPart("w_in", torch.arange(9), nine, *bagged).bags()
    assert not LoRAPart("w_in", torch.arange(10), ten, *bagged).bags()
    assert not LoRAPart("w_in", torch.arange(10), ten, *bagged).gathers()
    assert not LoRAPart("w_in", torch.arange(9), nine, *plain).bags()


@pytest.mark.parametrize("bag_indices", [5, woven.BAG_INDICES])  # 5: one row per chunk
def test_bagged_lora_is_each_rows_own_product(bag_indices: int) -> None:
    torch.manual_seed(0)
    slots = Groups(np.array([2, 0, 3]), torch.tensor([2, 0, 3]))
    A, B = woven.bag_layout(torch.randn(3, 2, 5), torch.randn(3, 6, 2))
    x, rows, slot_of_row = torch.randn(7, 5), [6, 0, 2, 3, 5], [0, 0, 2, 2, 2]
    expected = torch.stack([B[slot] @ (A[slot] @ x[n]) for n, slot in zip(rows, slot_of_row, strict=True)])
    with GatherThreshold(1, bag_indices):
        got = woven.bagged_lora(x, torch.tensor(rows), A, B, slots)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("target", TARGETS)
def test_gathered_lora_is_each_rows_own_product(target: str) -> None:
    torch.manual_seed(0)
    slots = Groups(np.array([2, 0, 1]), torch.tensor([2, 0, 1]))
    A, B, x = torch.randn(3, 2, 5), torch.randn(3, 6, 2), torch.randn(3, 5)
    expected = torch.stack([B[slot] @ (A[slot] @ x[n]) for n, slot in enumerate([0, 0, 2])])
    torch.testing.assert_close(woven.gathered_lora(x, A, B, slots), expected)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(1, 9))
@settings(max_examples=40, deadline=None)
def test_split_parts_cover_the_slots_and_add_up(counts: list[int], pieces: int) -> None:
    torch.manual_seed(0)
    n = sum(counts)
    slots = Groups(np.array(counts, dtype=np.int64), torch.tensor(counts))
    part = LoRAPart(
        "w_in",
        torch.randperm(n + 3)[:n],
        slots,
        torch.randn(len(counts), 2, 5),
        torch.randn(len(counts), 4, 2),
    )
    x = torch.randn(n + 3, 5)
    split = part.split(pieces)
    assert 1 <= len(split) <= max(pieces, 1) or n == 0
    assert torch.equal(torch.cat([p.rows_n for p in split]), part.rows_n)
    assert sum(len(p.slots.counts_G) for p in split) <= len(counts)
    whole = part.delta(x, "loop")
    torch.testing.assert_close(torch.cat([p.delta(x, "loop") for p in split]), whole)
