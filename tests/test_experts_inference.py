"""``GroupedExperts.prepare_for_inference``: the packed CPU no-grad path.

It equals the per-expert ``loop`` backend and the slow reference on every shape and
configuration (empty and one-row experts, segments past the packed-row limit, biases,
every activation, row weights, threads); it is never used stale after the weights
change; and every forward it does not cover runs the existing paths.

Legend: N rows (expert-major), D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexmoe.experts.ffn as ffn_module
import flexmoe.experts.packed as packed_module
from flexmoe import MoELayer
from flexmoe.experts import GroupedExperts
from flexmoe.experts.backends import grouped_ffn
from flexmoe.experts.packed import MAX_PACKED_ROWS, packed_inference_supported
from tests.reference import ffn
from tests.test_layer_reference import Case, assert_close_scaled, build, cases, reference_for_layer

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    not packed_inference_supported(CPU, torch.float32), reason="this PyTorch build has no oneDNN"
)


@contextlib.contextmanager
def packed_calls() -> Iterator[mock.MagicMock]:
    """Count the forwards that run on the packed weights."""
    with mock.patch.object(
        ffn_module, "packed_ffn_inference", wraps=packed_module.packed_ffn_inference
    ) as spy:
        yield spy


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loop_output(
    experts: GroupedExperts, x: torch.Tensor, counts: list[int], rw: torch.Tensor | None
) -> torch.Tensor:
    """The existing per-expert autograd loop on the module's current weights."""
    with torch.no_grad():
        return grouped_ffn(
            "loop",
            x,
            counts,
            experts.w_in,
            experts.w_out,
            experts.b_in,
            experts.b_out,
            experts.activation,
            rw,
        )


def reference_output(
    experts: GroupedExperts, x: torch.Tensor, counts: list[int], rw: torch.Tensor | None
) -> torch.Tensor:
    """tests/reference.py's one-token FFN in float64, row by row, times the row weight."""
    params = {name: p.detach().double() for name, p in experts.named_parameters()}
    rows, start = [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            b_in, b_out = params.get("b_in"), params.get("b_out")
            y = ffn(
                x[r].double(),
                params["w_in"][e],
                params["w_out"][e],
                None if b_in is None else b_in[e],
                None if b_out is None else b_out[e],
                experts.activation,
            )
            rows.append(y if rw is None else y * float(rw[r]))
        start += n
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1], dtype=torch.float64)


def make_input(N: int, D: int, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.randn(N, D), (torch.rand(N) + 0.1 if weighted else None)


# ------------------------------------------------------------------- equivalence
@st.composite
def expert_cases(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 6))
    return {
        "counts": draw(st.lists(st.sampled_from([0, 0, 1, 1, 2, 3, 5, 9]), min_size=E, max_size=E)),
        "D": draw(st.integers(1, 9)),
        "F": draw(st.integers(1, 7)),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "bias": draw(st.booleans()),
        "weighted": draw(st.booleans()),
        # Past this many rows a segment runs MKL on the plain weights: small limits reach it here.
        "max_packed_rows": draw(st.sampled_from([MAX_PACKED_ROWS, 3, 1])),
        "threads": draw(st.sampled_from([1, 2])),
        "inference_mode": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=120)
@given(case=expert_cases())
def test_prepared_equals_loop_and_reference(case: dict) -> None:
    torch.manual_seed(case["seed"])
    counts = case["counts"]
    N = sum(counts)
    experts = GroupedExperts(len(counts), case["D"], case["F"], case["activation"], case["bias"])
    x, rw = make_input(N, case["D"], case["weighted"])
    expected = loop_output(experts, x, counts, rw)
    reference = reference_output(experts, x, counts, rw)

    assert experts.prepare_for_inference()
    assert experts.inference_prepared
    no_grad = torch.inference_mode if case["inference_mode"] else torch.no_grad
    with (
        packed_calls() as spy,
        mock.patch.object(packed_module, "MAX_PACKED_ROWS", case["max_packed_rows"]),
        num_threads(case["threads"]),
        no_grad(),
    ):
        y = experts(x, counts, rw)
    assert spy.call_count == 1
    assert y.shape == (N, case["D"]) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert_close_scaled(y, reference, rel=2e-5, floor=1e-5, name="y")


def test_prepared_threaded_segments_equal_loop() -> None:
    # Balanced segments on 2 threads: the helper threads run the packed GEMMs too.
    torch.manual_seed(0)
    counts = [3, 1, 4, 2, 2, 5, 3, 1, 0, 4, 2, 2]
    experts = GroupedExperts(len(counts), 64, 48, "swiglu", bias=True)
    x, rw = make_input(sum(counts), 64, weighted=True)
    expected = loop_output(experts, x, counts, rw)
    experts.prepare_for_inference()
    with packed_calls() as spy, num_threads(2), torch.inference_mode():
        for _ in range(3):  # repeated calls reuse pooled buffers
            torch.testing.assert_close(experts(x, counts, rw), expected, atol=1e-5, rtol=1e-5)
    assert spy.call_count == 3


@settings(max_examples=40)
@given(case=cases(backends=("fused",)))
def test_prepared_layer_matches_reference(case: Case) -> None:
    layer, x, _ = build(case)
    out, _ = reference_for_layer(layer, x, x.double(), case.top_k, case.capacity_factor)
    assert isinstance(layer.experts, GroupedExperts)
    assert layer.experts.prepare_for_inference()
    with packed_calls() as spy, torch.no_grad():
        y = layer(x, top_k=case.top_k, capacity_factor=case.capacity_factor)
    assert spy.call_count == 1
    assert_close_scaled(y, out.y_TD, rel=2e-5, floor=1e-5, name="y")


@pytest.mark.skipif(
    not packed_inference_supported(CPU, torch.bfloat16), reason="no native bf16 matmuls on this CPU"
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_prepared_bf16_equals_loop(activation: str) -> None:
    torch.manual_seed(0)
    counts = [0, 1, 2, 5, 3]
    experts = GroupedExperts(len(counts), 32, 16, activation, bias=True, dtype=torch.bfloat16)
    x, rw = make_input(sum(counts), 32, weighted=True)
    x, rw = x.bfloat16(), rw.bfloat16()
    expected = loop_output(experts, x, counts, rw)
    assert experts.prepare_for_inference()
    with packed_calls() as spy, torch.no_grad():
        y = experts(x, counts, rw)
    assert spy.call_count == 1
    torch.testing.assert_close(y.float(), expected.float(), atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------- never stale
def _adam(fused: bool) -> Callable[[GroupedExperts], None]:
    def step(experts: GroupedExperts) -> None:
        optimizer = torch.optim.Adam(
            experts.parameters(), lr=0.1, fused=fused, foreach=None if fused else True
        )
        x = torch.randn(6, experts.dim)
        experts(x, [2, 1, 3]).square().sum().backward()
        optimizer.step()

    return step


def _sgd(fused: bool) -> Callable[[GroupedExperts], None]:
    def step(experts: GroupedExperts) -> None:
        optimizer = torch.optim.SGD(experts.parameters(), lr=0.5, fused=fused or None)
        x = torch.randn(6, experts.dim)
        experts(x, [2, 1, 3]).square().sum().backward()
        optimizer.step()

    return step


def _copy_in(experts: GroupedExperts) -> None:
    with torch.no_grad():
        experts.w_in.copy_(torch.randn_like(experts.w_in))


def _one_expert_in_place(experts: GroupedExperts) -> None:
    with torch.no_grad():
        experts.w_out[1].mul_(-2.0)  # a view: bumps the whole parameter's version counter


def _load_state_dict(experts: GroupedExperts) -> None:
    other = GroupedExperts(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, True)
    experts.load_state_dict(other.state_dict())


def _replace_data(experts: GroupedExperts) -> None:
    experts.w_out.data = torch.randn_like(experts.w_out)


def _dtype_round_trip(experts: GroupedExperts) -> None:
    experts.double()
    with torch.no_grad():
        experts.w_in.mul_(0.5)
    experts.float()


UPDATES = {
    "copy_": _copy_in,
    "in-place on one expert": _one_expert_in_place,
    "load_state_dict": _load_state_dict,
    "sgd step": _sgd(fused=False),
    "sgd fused step": _sgd(fused=True),
    "adam foreach step": _adam(fused=False),
    "adam fused step": _adam(fused=True),
    ".data = new tensor": _replace_data,
    ".double(), change, .float()": _dtype_round_trip,
}


@pytest.mark.parametrize("update", list(UPDATES))
def test_weight_updates_after_prepare_are_never_served_stale(update: str) -> None:
    torch.manual_seed(0)
    counts = [2, 1, 3]
    experts = GroupedExperts(3, 8, 5, "swiglu", bias=True)
    x, rw = make_input(6, 8, weighted=True)
    assert experts.prepare_for_inference()
    with torch.no_grad():
        before = experts(x, counts, rw)

    UPDATES[update](experts)
    experts.eval()
    expected = loop_output(experts, x, counts, rw)
    assert not torch.allclose(expected, before), "the update must change the output"
    assert not experts.inference_prepared
    with packed_calls() as spy, torch.no_grad():
        y = experts(x, counts, rw)
    assert spy.call_count == 0
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert experts._packed is None  # the stale copies are gone, not just skipped

    # Preparing again packs the new weights.
    assert experts.prepare_for_inference()
    with packed_calls() as spy, torch.no_grad():
        y = experts(x, counts, rw)
    assert spy.call_count == 1
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_train_mode_releases_packed_weights() -> None:
    experts = GroupedExperts(3, 8, 5, "geglu")
    assert experts.prepare_for_inference()
    experts.eval()
    assert experts.inference_prepared
    MoELayer(8, 5, 3, 1).experts.train()  # another module's train() changes nothing here
    assert experts.inference_prepared
    experts.train()
    assert not experts.inference_prepared and experts._packed is None


def test_optimizer_over_other_parameters_keeps_packed_weights() -> None:
    # Frozen experts, trained adapters: only an optimizer that holds the weights invalidates.
    experts = GroupedExperts(3, 8, 5, "swiglu")
    adapter = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(adapter.parameters(), fused=True)
    assert experts.prepare_for_inference()
    adapter(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    assert experts.inference_prepared


def test_release_and_copies() -> None:
    torch.manual_seed(0)
    counts = [1, 0, 4]
    experts = GroupedExperts(3, 8, 5, "silu", bias=True)
    x, rw = make_input(5, 8, weighted=True)
    expected = loop_output(experts, x, counts, rw)
    assert experts.prepare_for_inference()

    # Copies and pickles never carry the opaque packed tensors: they run the plain path.
    for clone in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
        assert not clone.inference_prepared
        with packed_calls() as spy, torch.no_grad():
            torch.testing.assert_close(clone(x, counts, rw), expected, atol=1e-5, rtol=1e-5)
        assert spy.call_count == 0
    assert experts.inference_prepared

    experts.release_inference_weights()
    assert not experts.inference_prepared
    with packed_calls() as spy, torch.no_grad():
        torch.testing.assert_close(experts(x, counts, rw), expected, atol=1e-5, rtol=1e-5)
    assert spy.call_count == 0


# ------------------------------------------------------------------- fallback
def test_grad_enabled_runs_the_autograd_path() -> None:
    torch.manual_seed(0)
    counts = [2, 3, 1]
    experts = GroupedExperts(3, 8, 5, "swiglu", bias=True)
    reference = copy.deepcopy(experts)
    x, rw = make_input(6, 8, weighted=True)
    assert experts.prepare_for_inference()
    with packed_calls() as spy:
        y = experts(x, counts, rw)
        y.square().sum().backward()
    assert spy.call_count == 0
    reference(x, counts, rw, backend="loop").square().sum().backward()
    for p, q in zip(experts.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    # The backward alone does not touch the weights: still prepared until a step.
    assert experts.inference_prepared


@pytest.mark.parametrize("how", ["backend=loop", "backend=grouped_mm", "module backend loop", "autocast"])
def test_other_backends_and_autocast_run_unchanged(how: str) -> None:
    torch.manual_seed(0)
    counts = [2, 0, 3]
    experts = GroupedExperts(3, 8, 8, "swiglu", backend="loop" if how == "module backend loop" else "auto")
    x, _ = make_input(5, 8, weighted=False)
    expected = loop_output(experts, x, counts, None)
    assert experts.prepare_for_inference()
    with packed_calls() as spy, torch.no_grad():
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = experts(x, counts)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)
        else:
            backend = how.removeprefix("backend=") if how.startswith("backend=") else None
            torch.testing.assert_close(experts(x, counts, backend=backend), expected, atol=1e-5, rtol=1e-5)
    assert spy.call_count == 0


def test_unsupported_devices_and_dtypes_prepare_nothing() -> None:
    assert not packed_inference_supported(torch.device("cuda"), torch.float32)
    assert not packed_inference_supported(torch.device("meta"), torch.float32)
    assert not packed_inference_supported(CPU, torch.float64)
    assert not packed_inference_supported(CPU, torch.float16)
    experts = GroupedExperts(2, 4, 3, "relu", dtype=torch.float64)
    assert not experts.prepare_for_inference()
    assert not experts.inference_prepared and experts._packed is None
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, [1, 2]), loop_output(experts, x, [1, 2], None))


def test_layer_with_prepared_experts_and_drops() -> None:
    # Capacity 1 per expert: one-row and empty segments through the whole layer.
    torch.manual_seed(0)
    layer = MoELayer(8, 5, 4, 2, capacity_factor=0.01)
    assert isinstance(layer.experts, GroupedExperts)
    expected_layer = copy.deepcopy(layer)
    assert layer.experts.prepare_for_inference()
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected_layer(x), atol=1e-5, rtol=1e-5)
