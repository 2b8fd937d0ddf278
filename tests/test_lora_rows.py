"""flexmoe.experts.lora_rows.lora_add: the LoRA terms of a multi-adapter batch, summed in place, vs fp64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe.adapters.woven import bag_layout
from flexmoe.experts.kernels import available
from flexmoe.experts.lora_rows import lora_add, takes_lora

pytestmark = pytest.mark.skipif(not available(), reason="needs a CPU with AVX512-BF16 and a C compiler")

BF16_STEP = 2.0**-8  # the largest relative rounding error of a bf16 value


def lora_case(seed: int, counts: list[int], rank: int, width_in: int, blocks: int, width: int, spare: int):
    """Rows of ``x`` (some in no slot), factors in the weave's layout, an output with gaps between rows."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(counts)
    N = n + spare
    rows_n = torch.randperm(N, generator=generator)[:n]
    A, B = bag_layout(
        torch.randn(len(counts), rank, width_in, generator=generator),
        torch.randn(len(counts), blocks * width, rank, generator=generator),
    )
    x = torch.randn(N, width_in + 3, generator=generator)[:, :width_in]  # rows apart: stride > width
    out = torch.randn(blocks, N, width + 2, generator=generator)[:, :, :width]
    return rows_n, A, B, x, out


def expected_sums(rows_n, counts, A, B, x, out) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` plus each row's ``B[l] A[l] x[row]`` in fp64, row by row; and the same over absolute values.

    The second bounds the rounding: an fp32 sum of those terms errs by at most a few
    fp32 steps of it.
    """
    result, magnitude = out.double().clone(), out.double().abs()
    blocks, _, width = out.shape
    slot_of = np.repeat(np.arange(len(counts)), counts)
    for k, row in enumerate(rows_n.tolist()):
        slot = int(slot_of[k])
        A_l, B_l, x_r = A[slot].double(), B[slot].double(), x[row].double()
        result[:, row] += (B_l @ (A_l @ x_r)).view(blocks, width)
        magnitude[:, row] += (B_l.abs() @ (A_l.abs() @ x_r.abs())).view(blocks, width)
    return result, magnitude


def assert_within_rounding(out, expected, magnitude, dtype) -> None:
    """fp32 sums, rounded once to a bf16 output: a bf16 step of the total, else fp32 steps of the terms."""
    bound = BF16_STEP * magnitude if dtype == torch.bfloat16 else 1e-5 * magnitude
    assert ((out.double() - expected).abs() <= bound + 1e-12).all()


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.integers(0, 19), min_size=0, max_size=6),  # 19: blocks of 8, 4 and single rows
    rank=st.sampled_from([1, 2, 3, 4, 8, 16, 17, 40]),  # 16 / rank columns per vector where it divides 16
    width_in=st.integers(1, 70),
    blocks=st.sampled_from([1, 2]),
    width=st.integers(1, 40),
    spare=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_lora_terms_equal_each_rows_fp64_product(counts, rank, width_in, blocks, width, spare, dtype, seed):
    rows_n, A, B, x, out = lora_case(seed, counts, rank, width_in, blocks, width, spare)
    x, out = x.to(dtype), out.to(dtype)
    A, B = bag_layout(A.to(dtype), B.to(dtype))
    assert takes_lora(x, rows_n, A, B, out)
    expected, magnitude = expected_sums(rows_n, counts, A, B, x, out)
    untouched = [r for r in range(x.shape[0]) if r not in set(rows_n.tolist())]
    before = out.clone()
    lora_add(x, rows_n, np.array(counts, dtype=np.int64), A, B, out)
    assert_within_rounding(out, expected, magnitude, dtype)
    assert torch.equal(out[:, untouched], before[:, untouched])  # rows of no slot stay as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_terms_of_wide_rows_equal_the_fp64_products(dtype):
    # 8 bf16 rows of 4200 columns do not fit the stack copy the narrow-rank path widens them into
    counts = [9, 1]
    rows_n, A, B, x, out = lora_case(1, counts, 8, 4200, 2, 24, 2)
    x, out = x.to(dtype), out.to(dtype)
    A, B = bag_layout(A.to(dtype), B.to(dtype))
    expected, magnitude = expected_sums(rows_n, counts, A, B, x, out)
    lora_add(x, rows_n, np.array(counts, dtype=np.int64), A, B, out)
    assert_within_rounding(out, expected, magnitude, dtype)


def test_what_the_lora_kernel_takes():
    rows_n, A, B, x, out = lora_case(0, [2, 3], 4, 8, 2, 6, 1)
    counts = np.array([2, 3])
    assert takes_lora(x, rows_n, A, B, out)
    plain_A = A.contiguous()  # [L, r, I] row-major: not the weave's layout
    assert not takes_lora(x, rows_n, plain_A, B, out)
    assert not takes_lora(x.double(), rows_n, A.double(), B.double(), out.double())
    assert not takes_lora(x, rows_n.int(), A, B, out)
    assert not takes_lora(x, rows_n, A, B, out[:, :, :5])  # 2 x 5 outputs for 12 columns of B
    wide_rank = bag_layout(torch.randn(2, 1025, 8), torch.randn(2, 12, 1025))
    assert not takes_lora(x, rows_n, *wide_rank, out)
    with pytest.raises(ValueError, match="counts_L"):
        lora_add(x, rows_n, np.array([2, 2]), A, B, out)
    with pytest.raises(IndexError, match="rows_n"):
        lora_add(x, rows_n + x.shape[0], counts, A, B, out)
