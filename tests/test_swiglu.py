"""The one-pass gated SiLU kernels against PyTorch's elementwise ops in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe.experts import kernels
from flexmoe.experts.swiglu import swiglu_backward_into, swiglu_into, takes_swiglu

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU kernel library does not run here")

# fp32: a few ulp of the exp polynomial; bf16: one rounding of the output
TOLERANCE = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1e-2, 1e-2)}


def halves(rows: int, cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up as the two halves of one ``[2 rows, cols]`` grid (the fused backend's layout)."""
    generator = torch.Generator().manual_seed(seed)
    h = (3 * torch.randn(2 * rows, cols, generator=generator)).to(dtype)
    return h[:rows], h[rows:]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol * max(1.0, expected.abs().max())
    )


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    per=st.sampled_from([None, "row", "column"]),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_the_elementwise_ops(rows, cols, dtype, per, seed):
    gate, up = halves(rows, cols, dtype, seed)
    weights = None if per is None else torch.rand(rows if per == "row" else cols)
    out = torch.full((rows, cols), float("nan"), dtype=dtype)
    assert takes_swiglu(gate, up, out)
    swiglu_into(gate, up, weights, out, per=per)
    expected = F.silu(gate.double()) * up.double()
    if per == "row":
        expected = expected * weights.double()[:, None]
    elif per == "column":
        expected = expected * weights.double()
    close(out, expected, dtype)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    per=st.sampled_from([None, "row", "column"]),
    outputs=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backward_equals_autograd(rows, cols, dtype, per, outputs, seed):
    gate, up = halves(rows, cols, dtype, seed)
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    length = rows if per == "row" else cols
    weights = None if per is None else torch.rand(length)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    w64 = (torch.ones(length, dtype=torch.float64) if per is None else weights.double()).requires_grad_()
    a64 = F.silu(g64) * u64 * (w64[:, None] if per == "row" else w64)
    a64.backward(grad.double())
    grad_h = torch.full((rows, 2 * cols), float("nan"), dtype=dtype)  # both gradients as one grid's halves
    a_w = torch.full((rows, cols), float("nan"), dtype=dtype) if outputs else None
    grad_w = torch.full((length,), float("nan")) if outputs and per else None
    swiglu_backward_into(gate, up, grad, weights, grad_h[:, :cols], grad_h[:, cols:], a_w, grad_w, per=per)
    close(grad_h[:, :cols], g64.grad, dtype)
    close(grad_h[:, cols:], u64.grad, dtype)
    if a_w is not None:
        close(a_w, a64.detach(), dtype)
    if grad_w is not None:
        summed = cols if per == "row" else rows
        torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-4, atol=1e-4 * summed)


def test_nan_stays_nan_and_large_gates_stay_finite():
    gate = torch.tensor([[float("nan"), 100.0, -100.0, 0.0]])
    up = torch.ones(1, 4)
    out = torch.empty(1, 4)
    swiglu_into(gate, up, None, out)
    assert out[0, 0].isnan()
    torch.testing.assert_close(out[0, 1:], F.silu(gate[0, 1:]))


def test_grids_without_rows_or_columns():
    gate, up = torch.empty(0, 5), torch.empty(0, 5)
    swiglu_into(gate, up, torch.ones(5), torch.empty(0, 5), per="column")
    grad_w = torch.full((5,), 7.0)
    empty = torch.empty(0, 5)
    swiglu_backward_into(gate, up, empty, torch.ones(5), empty, empty.clone(), None, grad_w, per="column")
    assert grad_w.eq(0).all()  # a sum over no rows


def test_what_the_kernels_refuse():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    assert not takes_swiglu(gate, up.double())
    assert not takes_swiglu(gate, up.t().contiguous().t())  # columns not contiguous
    assert not takes_swiglu(gate, torch.randn(4, 9))
    assert not takes_swiglu(gate.half(), up.half())
    with pytest.raises(ValueError, match="per: expected 'row' or 'column' with weights"):
        swiglu_into(gate, up, torch.ones(4), torch.empty(4, 8))
    with pytest.raises(ValueError, match="per: expected"):
        swiglu_into(gate, up, None, torch.empty(4, 8), per="row")
    with pytest.raises(ValueError, match="weights: expected 8 weights"):
        swiglu_into(gate, up, torch.ones(4), torch.empty(4, 8), per="column")
    with pytest.raises(ValueError, match="swiglu: expected CPU fp32 or bf16 grids"):
        swiglu_into(gate, up, None, torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="grad_weights: expected a contiguous fp32"):
        swiglu_backward_into(
            gate, up, gate, torch.ones(8), gate.clone(), up.clone(), None, torch.empty(8).double(), "column"
        )
    with pytest.raises(ValueError, match="grad_weights: there are no weights"):
        swiglu_backward_into(gate, up, gate, None, gate.clone(), up.clone(), None, torch.empty(8))
