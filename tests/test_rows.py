"""flexmoe.experts.rows: the few-row bf16 and int8 kernels against an fp64 reference."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe.experts import GroupedExperts, backends, decoding
from flexmoe.experts import rows as rows_module
from flexmoe.experts.int8 import Int8Weight, int8_linear
from flexmoe.experts.kernels import (
    available,
    bf16_max_rows,
    openmp_threads,
    set_tile_kernels,
    tile_kernels,
)
from flexmoe.experts.rows import (
    FP32_MAX_ROWS,
    FP32_MAX_ROWS_LARGE,
    INT8_MAX_ROWS,
    expert_bf16,
    expert_int8,
    experts_bf16,
    experts_bf16_at,
    experts_int8_at,
    rows_bf16,
    rows_bf16_segments,
    rows_fp32,
    rows_int8,
    takes_bf16,
    takes_bf16_segments,
    takes_expert_bf16,
    takes_expert_int8,
    takes_experts_bf16,
    takes_experts_bf16_at,
    takes_experts_int8_at,
    takes_fp32,
    takes_int8,
)
from flexmoe.experts.served import served_linear
from tests.reference import ffn

pytestmark = pytest.mark.skipif(not available(), reason="needs a CPU with AVX512-BF16 and a C compiler")

BF16_STEP = 2.0**-8  # the largest relative rounding error of a bf16 output
TILE_ROWS = 32  # the most rows the AMX tile kernels take


@contextlib.contextmanager
def bf16_kernels(tiles: bool) -> Iterator[int]:
    """The bf16 kernels on AMX tiles or on the vector units; yields the most rows they take."""
    before = tile_kernels()
    if set_tile_kernels(tiles) != tiles:
        set_tile_kernels(before)
        pytest.skip("this CPU has no AMX tiles")
    try:
        yield bf16_max_rows()
    finally:
        set_tile_kernels(before)


def test_the_tile_kernels_take_up_to_32_rows_and_the_vector_kernels_2():
    with bf16_kernels(tiles=False) as vector_rows:
        assert vector_rows == 2 and not tile_kernels()
    with bf16_kernels(tiles=True) as tile_rows:
        assert tile_rows == TILE_ROWS and tile_kernels()


def tensors(rows: int, outputs: int, inputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
    w = torch.randn(outputs, inputs, generator=generator).to(torch.bfloat16)
    return x, w


@pytest.mark.parametrize("tiles", [False, True], ids=["vector", "tiles"])
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, TILE_ROWS),  # taken modulo what the kernels take
    outputs=st.integers(1, 70),  # whole and short 16-row tile blocks, 4-row vector blocks
    inputs=st.integers(1, 100),  # full 32-column blocks and tails
    seed=st.integers(0, 2**16),
)
def test_bf16_rows_equal_the_fp64_product(tiles, rows, outputs, inputs, seed):
    with bf16_kernels(tiles) as max_rows:
        rows = 1 + (rows - 1) % max_rows
        x, w = tensors(rows, outputs, inputs, seed)
        assert takes_bf16(x, w)
        y = rows_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, outputs)
    expected = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T  # bounds every partial sum
    bound = BF16_STEP * expected.abs() + 1e-6 * magnitude + 1e-30
    assert bool(((y.double() - expected).abs() <= bound).all())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, INT8_MAX_ROWS),
    outputs=st.integers(1, 19),
    inputs=st.integers(1, 150),  # whole 64-column lines, 32-column steps and masked tails
    seed=st.integers(0, 2**16),
    zero_row=st.booleans(),
)
def test_int8_rows_equal_the_fp64_product_within_the_fixed_point_bound(rows, outputs, inputs, seed, zero_row):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, inputs, generator=generator) * 3).to(torch.bfloat16)
    if zero_row:
        x[0] = 0
    weight = Int8Weight.quantize(torch.randn(outputs, inputs, generator=generator))
    assert takes_int8(x, weight.q)
    y = rows_int8(x, weight.q, weight.scale)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, outputs)
    q, scale, x64 = weight.q.double(), weight.scale.double(), x.double()
    expected = (x64 @ q.T) * scale
    # each x is rounded to a step of max|x_row| / 32767: off by half a step at most
    half_step = x64.abs().amax(dim=1, keepdim=True) / 32767 / 2
    fixed_point = half_step * (q.abs().sum(dim=1) * scale)
    bound = BF16_STEP * expected.abs() + 1.01 * fixed_point + 1e-30
    assert bool(((y.double() - expected).abs() <= bound).all())
    if zero_row:
        assert not y[0].any()


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, FP32_MAX_ROWS_LARGE),
    outputs=st.integers(1, 19),
    inputs=st.integers(1, 150),  # whole 16-column steps and masked tails
    seed=st.integers(0, 2**16),
)
def test_fp32_rows_equal_the_fp64_product(rows, outputs, inputs, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inputs, generator=generator)
    weight = torch.randn(outputs, inputs, generator=generator)
    with pytest.MonkeyPatch.context() as patch:  # every row count the kernel has paths for
        patch.setattr(rows_module, "FP32_MAX_ROWS", FP32_MAX_ROWS_LARGE)
        assert takes_fp32(x, weight)
        y = rows_fp32(x, weight)
        out = torch.full((rows, outputs), float("nan"))
        assert rows_fp32(x, weight, out=out) is out and torch.equal(out, y)
    assert y.dtype == torch.float32 and y.shape == (rows, outputs)
    expected = x.double() @ weight.double().T
    # fp32 sums of `inputs` products: within (inputs + 2) fp32 unit roundoffs of the sum of magnitudes
    bound = (inputs + 2) * 2.0**-24 * (x.double().abs() @ weight.double().abs().T) + 1e-30
    assert bool(((y.double() - expected).abs() <= bound).all())


def test_fp32_rows_take_a_few_rows_of_plain_fp32_weights():
    small, large = torch.ones(8, 16), torch.ones(1024, 1024)  # 512 B, 4 MiB
    assert takes_fp32(torch.ones(FP32_MAX_ROWS, 16), small)
    assert not takes_fp32(torch.ones(FP32_MAX_ROWS + 1, 16), small)
    assert takes_fp32(torch.ones(FP32_MAX_ROWS_LARGE, 1024), large)
    assert not takes_fp32(torch.ones(FP32_MAX_ROWS_LARGE + 1, 1024), large)
    assert not takes_fp32(torch.ones(2, 16).bfloat16(), small.bfloat16())
    assert not takes_fp32(torch.ones(2, 32)[:, ::2], small)  # strided rows
    assert not takes_fp32(torch.ones(2, 16), small.t().contiguous().t())
    with pytest.raises(ValueError, match="out"):
        rows_fp32(torch.ones(2, 16), small, out=torch.empty(2, 9))
    nan = torch.full((1, 16), float("nan"))
    assert torch.isnan(rows_fp32(nan, small)).all()


def test_int8_sums_longer_than_a_chunk_do_not_overflow():
    # every product at its largest: an int32 sum over 9000 columns would overflow
    inputs = 9000
    q = torch.full((3, inputs), 127, dtype=torch.int8)
    q[1] = -127
    x = torch.full((1, inputs), 2.0, dtype=torch.bfloat16)
    y = rows_int8(x, q, torch.ones(3))
    expected = torch.tensor([[2.0 * 127 * inputs, -2.0 * 127 * inputs, 2.0 * 127 * inputs]])
    torch.testing.assert_close(y.double(), expected.double(), rtol=BF16_STEP, atol=0)


def test_a_row_that_is_not_finite_gives_nan_and_leaves_the_others():
    q = torch.ones(2, 40, dtype=torch.int8)
    x = torch.ones(3, 40, dtype=torch.bfloat16)
    x[1, 5] = float("inf")
    x[2, 7] = float("nan")
    y = rows_int8(x, q, torch.ones(2))
    assert bool(y[1:].isnan().all())
    torch.testing.assert_close(y[0].double(), torch.full((2,), 40.0, dtype=torch.float64))


def test_what_the_kernels_take():
    x, w = tensors(1, 4, 64, 0)
    many = torch.randn(bf16_max_rows() + 1, 64).to(torch.bfloat16)
    q = torch.ones(4, 64, dtype=torch.int8)
    assert not takes_bf16(many, w)  # more rows: PyTorch's product is as fast
    assert not takes_bf16(x.float(), w.float())
    assert not takes_bf16(x, w.T.contiguous().T)  # a strided weight
    assert not takes_bf16(x[:, :32], w)
    assert not takes_int8(x.float(), q)  # fp32 rows keep fp32 sums of exact products
    assert not takes_int8(torch.randn(INT8_MAX_ROWS + 1, 64).to(torch.bfloat16), q)
    assert not takes_int8(torch.empty(0, 64, dtype=torch.bfloat16), q)


def test_served_and_int8_linear_use_them_for_decoding_rows():
    x, w = tensors(1, 8, 64, 1)
    assert torch.equal(served_linear(x, w), rows_bf16(x, w))
    weight = Int8Weight.quantize(w.float())
    assert torch.equal(int8_linear(x, weight), rows_int8(x, weight.q, weight.scale))


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.sampled_from([0, 1, 1, 2, 2, 3, 6]), min_size=2, max_size=6),
    activation=st.sampled_from(["swiglu", "gelu", "relu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_expert_inference_on_plain_weights_equals_the_fp64_reference(counts, activation, bias, seed):
    # decoding rows (1-2 per expert) run on the row kernels (the whole expert in one call
    # without biases, each product with them), the others on the BLAS products
    torch.manual_seed(seed)
    experts = GroupedExperts(len(counts), 64, 48, activation, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(sum(counts), 64).to(torch.bfloat16)
    row_weights = torch.rand(sum(counts)).to(torch.bfloat16)
    with (
        torch.no_grad(),
        mock.patch.object(backends, "rows_bf16", wraps=rows_bf16) as products,
        mock.patch.object(decoding, "experts_bf16", wraps=experts_bf16) as whole,
    ):
        y = experts(x, counts, row_weights)
    decoding_rows = sum(1 for n in counts if 1 <= n <= bf16_max_rows())
    whole_segments = sum(len(call.args[2]) for call in whole.call_args_list)  # counts, one per segment
    assert whole.call_count <= 1  # every whole expert of the stack in one call
    assert (products.call_count, whole_segments) == ((2 * decoding_rows, 0) if bias else (0, decoding_rows))
    params = {name: p.detach().double() for name, p in experts.named_parameters()}
    rows, start = [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n):
            b_in, b_out = (None, None) if not bias else (params["b_in"][e], params["b_out"][e])
            out = ffn(x[r].double(), params["w_in"][e], params["w_out"][e], b_in, b_out, activation)
            rows.append(out * float(row_weights[r]))
        start += n
    if not rows:
        assert y.shape == (0, 64)
        return
    expected = torch.stack(rows)
    # bf16 rounds the first projection, the activation and the output: a few bf16 steps
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=0.03 * (1 + float(expected.abs().max())))


@pytest.mark.parametrize("tiles", [False, True], ids=["vector", "tiles"])
@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, TILE_ROWS), min_size=1, max_size=5),
    activation=st.sampled_from(["swiglu", "gelu"]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_segments_in_one_call_equal_one_call_per_segment(tiles, counts, activation, weighted, seed):
    with bf16_kernels(tiles) as most_rows:
        counts = [min(n, most_rows) for n in counts]
        generator = torch.Generator().manual_seed(seed)
        E, D, F_ = 4, 40, 24
        H = 2 * F_ if activation == "swiglu" else F_
        w_in = torch.randn(E, H, D, generator=generator).to(torch.bfloat16)
        w_out = torch.randn(E, D, F_, generator=generator).to(torch.bfloat16)
        x = torch.randn(sum(counts), D, generator=generator).to(torch.bfloat16)
        weights = torch.rand(sum(counts), generator=generator) if weighted else None
        experts = torch.randint(0, E, (len(counts),), generator=generator).numpy()
        starts = np.cumsum([0, *counts[:-1]])
        counts_ = np.array(counts)
        assert takes_bf16_segments(x, counts_, w_in)
        assert takes_experts_bf16(x, counts_, w_in, w_out, activation)
        h = torch.empty(x.shape[0], H, dtype=torch.bfloat16)
        rows_bf16_segments(x, starts, counts_, w_in, experts, h)
        y = torch.empty_like(x)
        experts_bf16(x, starts, counts_, w_in, w_out, experts, activation, weights, y)
        for s, n, e in zip(starts, counts, experts, strict=True):
            rows = slice(int(s), int(s) + n)
            assert torch.equal(h[rows], rows_bf16(x[rows], w_in[e]))
            w_n = None if weights is None else weights[rows]
            assert torch.equal(y[rows], expert_bf16(x[rows], w_in[e], w_out[e], activation, w_n))
        assert not takes_bf16_segments(x, np.array([most_rows + 1]), w_in)  # more rows than they take
        assert not takes_bf16_segments(x, np.array([0]), w_in)  # an empty segment
        with pytest.raises(ValueError, match="y_NO"):
            rows_bf16_segments(x, starts, counts_, w_in, experts, h[:, :-1])
        with pytest.raises(IndexError, match="index"):
            experts_bf16(x, starts, counts_, w_in, w_out, experts + E, activation, weights, y)
        with pytest.raises(IndexError, match="starts"):
            rows_bf16_segments(x, starts + 1, counts_, w_in, experts, h)
        # the same experts held apart (an offloaded layer's cache entries): the same bits
        apart = [(w_in[e].clone(), w_out[e].clone()) for e in experts]
        assert takes_experts_bf16_at(x, counts_, apart, activation)
        y_apart = torch.empty_like(x)
        assert experts_bf16_at(x, starts, counts_, apart, activation, weights, y_apart)
        assert torch.equal(y_apart, y)
        mixed = [*apart[:-1], (apart[-1][0].float(), apart[-1][1])]
        assert not takes_experts_bf16_at(x, counts_, mixed, activation)  # one expert not bf16
        untouched = y_apart.clone()
        assert not experts_bf16_at(x, starts, counts_, mixed, activation, weights, y_apart)  # nothing written
        assert torch.equal(y_apart, untouched)
        assert not takes_experts_bf16_at(x, counts_, apart[1:] or [], activation)  # a pair per segment
        with pytest.raises(IndexError, match="starts"):
            experts_bf16_at(x, starts + 1, counts_, apart, activation, weights, y_apart)


def activated(h, activation: str):
    """The expert's activation in fp64 (gated: of the gate half, times the up half)."""
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation](h)


def expert_inputs(rows: int, dim: int, hidden: int, activation: str, weighted: bool, seed: int):
    """``(x, w_in, w_out, row_weights)``: bf16 rows, fp32 weights ``[H, D]`` and ``[D, F]``."""
    generator = torch.Generator().manual_seed(seed)
    H = hidden * (2 if activation in ("swiglu", "geglu") else 1)
    x = torch.randn(rows, dim, generator=generator).to(torch.bfloat16)
    w_in = torch.randn(H, dim, generator=generator).div(dim**0.5)
    w_out = torch.randn(dim, hidden, generator=generator)
    row_weights = torch.rand(rows, generator=generator).to(torch.bfloat16) if weighted else None
    return x, w_in, w_out, row_weights


def assert_expert_matches_fp64(y, x, w_in64, w_out64, activation: str, row_weights) -> None:
    """``y`` against the expert in fp64, within two bf16 roundings (the activation, the output)."""
    a = activated(x.double() @ w_in64.t(), activation)
    if row_weights is not None:
        a = a * row_weights.double()[:, None]
    expected = a @ w_out64.t()
    bound = 2**-7 * (a.abs() @ w_out64.abs().t() + expected.abs()) + 1e-6
    assert y.shape == expected.shape and y.dtype == torch.bfloat16
    assert ((y.double() - expected).abs() <= bound).all()


ACTIVATION_NAMES = st.sampled_from(["swiglu", "geglu", "silu", "gelu", "relu"])


@pytest.mark.parametrize("tiles", [False, True], ids=["vector", "tiles"])
@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, TILE_ROWS),  # taken modulo what the kernels take
    dim=st.integers(1, 90),
    hidden=st.integers(1, 40),  # whole and short 16-row tile blocks, odd widths
    activation=ACTIVATION_NAMES,
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_expert_in_one_call_equals_the_fp64_reference(
    tiles, rows, dim, hidden, activation, weighted, seed
):
    with bf16_kernels(tiles) as max_rows:
        rows = 1 + (rows - 1) % max_rows
        x, w_in, w_out, row_weights = expert_inputs(rows, dim, hidden, activation, weighted, seed)
        w_in, w_out = w_in.to(torch.bfloat16), w_out.to(torch.bfloat16)
        assert takes_expert_bf16(x, w_in, w_out, activation)
        y = expert_bf16(x, w_in, w_out, activation, row_weights)
    # fp32 sums and activation; the activation and the output each rounded to bf16 once
    assert_expert_matches_fp64(y, x, w_in.double(), w_out.double(), activation, row_weights)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, INT8_MAX_ROWS),
    dim=st.one_of(st.integers(1, 90), st.just(9000)),  # 9000: the integer sums move to fp32 in chunks
    hidden=st.integers(1, 24),
    activation=ACTIVATION_NAMES,
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_int8_expert_in_one_call_equals_the_fp64_reference(rows, dim, hidden, activation, weighted, seed):
    x, w_in, w_out, row_weights = expert_inputs(rows, dim, hidden, activation, weighted, seed)
    q_in, q_out = Int8Weight.quantize(w_in), Int8Weight.quantize(w_out)
    assert takes_expert_int8(x, q_in.q, q_out.q, activation)
    y = expert_int8(x, q_in.q, q_in.scale, q_out.q, q_out.scale, activation, row_weights)
    # the fixed-point rows (far below bf16's rounding), then as expert_bf16
    w_in64, w_out64 = q_in.dequantize(torch.float64), q_out.dequantize(torch.float64)
    assert_expert_matches_fp64(y, x, w_in64, w_out64, activation, row_weights)


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, INT8_MAX_ROWS), min_size=1, max_size=5),
    activation=st.sampled_from(["swiglu", "gelu"]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_experts_held_apart_in_one_call_equal_one_call_each(counts, activation, weighted, seed):
    generator = torch.Generator().manual_seed(seed)
    D, F_ = 40, 24
    H = 2 * F_ if activation == "swiglu" else F_
    experts = [
        (
            Int8Weight.quantize(torch.randn(H, D, generator=generator)),
            Int8Weight.quantize(torch.randn(D, F_, generator=generator)),
        )
        for _ in counts
    ]
    weights = [(a.q, a.scale, b.q, b.scale) for a, b in experts]
    x = torch.randn(sum(counts), D, generator=generator).to(torch.bfloat16)
    row_weights = torch.rand(sum(counts), generator=generator) if weighted else None
    starts, counts_ = np.cumsum([0, *counts[:-1]]), np.array(counts)
    assert takes_experts_int8_at(x, counts_, weights, activation)
    y = torch.empty_like(x)
    assert experts_int8_at(x, starts, counts_, weights, activation, row_weights, y)
    for s, n, (a, b) in zip(starts, counts, experts, strict=True):
        rows = slice(int(s), int(s) + n)
        w_n = None if row_weights is None else row_weights[rows]
        assert torch.equal(y[rows], expert_int8(x[rows], a.q, a.scale, b.q, b.scale, activation, w_n))
    assert not takes_experts_int8_at(x.float(), counts_, weights, activation)  # fp32 rows
    assert not takes_experts_int8_at(x, np.array([INT8_MAX_ROWS + 1]), weights[:1], activation)
    wider = [*weights[:-1], (weights[-1][0][:, :-1].contiguous(), *weights[-1][1:])]
    assert not takes_experts_int8_at(x, counts_, wider, activation)  # one expert of another shape
    untouched = y.clone()
    assert not experts_int8_at(x, starts, counts_, wider, activation, row_weights, y)  # nothing written
    assert torch.equal(y, untouched)
    with pytest.raises(IndexError, match="starts"):
        experts_int8_at(x, starts + 1, counts_, weights, activation, row_weights, y)


def test_one_expert_in_one_call_takes_only_what_it_computes():
    x, w_in, w_out = torch.ones(1, 8).bfloat16(), torch.ones(6, 8).bfloat16(), torch.ones(8, 3).bfloat16()
    assert takes_expert_bf16(x, w_in, w_out, "swiglu")
    assert not takes_expert_bf16(x, w_in, w_out, "silu")  # w_in has 2F rows: gated only
    assert not takes_expert_bf16(x, w_in, w_out, "tanh")
    assert not takes_expert_bf16(torch.ones(bf16_max_rows() + 1, 8).bfloat16(), w_in, w_out, "swiglu")
    assert not takes_expert_bf16(x.float(), w_in.float(), w_out.float(), "swiglu")
    assert not takes_expert_bf16(x, w_in, w_out.t().contiguous().t(), "swiglu")
    assert not takes_expert_bf16(x, w_in, torch.ones(8, 4).bfloat16(), "swiglu")
    nan = torch.full((1, 8), float("nan")).bfloat16()
    assert torch.isnan(expert_bf16(nan, w_in, w_out, "swiglu")).all()
    q_in, q_out = Int8Weight.quantize(w_in.float()), Int8Weight.quantize(w_out.float())
    assert takes_expert_int8(torch.ones(INT8_MAX_ROWS, 8).bfloat16(), q_in.q, q_out.q, "geglu")
    assert not takes_expert_int8(torch.ones(INT8_MAX_ROWS + 1, 8).bfloat16(), q_in.q, q_out.q, "geglu")
    assert not takes_expert_int8(x.float(), q_in.q, q_out.q, "geglu")  # fp32 rows keep PyTorch's kernel
    assert not takes_expert_int8(x, w_in, w_out, "geglu")
    assert torch.isnan(expert_int8(nan, q_in.q, q_in.scale, q_out.q, q_out.scale, "swiglu")).all()


def test_the_kernels_run_on_pytorchs_openmp_threads(two_threads):
    assert openmp_threads() == torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert openmp_threads() == 1


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


CHECK = """
import logging
logging.basicConfig(level=logging.WARNING)
from flexmoe.experts.kernels import available
print(available())
"""


def test_without_a_compiler_or_when_turned_off_the_kernels_are_unavailable(tmp_path):
    broken = run_python(CHECK, {"CC": "false", "XDG_CACHE_HOME": str(tmp_path)})
    assert broken.returncode == 0 and broken.stdout.strip() == "False"
    assert "CPU row kernels unavailable (false failed)" in broken.stderr
    assert not list(tmp_path.rglob("*.so"))
    off = run_python(CHECK, {"FLEXMOE_CPU_KERNELS": "0"})
    assert off.returncode == 0 and off.stdout.strip() == "False"


def test_a_compiler_without_amx_builds_the_vector_kernels_alone(tmp_path):
    compiler = tmp_path / "cc-without-amx"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-mamx-*) exit 1;; esac\nexec cc "$@"\n')
    compiler.chmod(0o755)
    code = "from flexmoe.experts.kernels import available, bf16_max_rows, tile_kernels\n"
    code += "print(available(), tile_kernels(), bf16_max_rows())"
    built = run_python(code, {"CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert built.returncode == 0 and built.stdout.split() == ["True", "False", "2"], built.stderr
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 1


def test_the_tile_kernels_can_be_turned_off_at_start():
    code = "from flexmoe.experts.kernels import available, bf16_max_rows, tile_kernels\n"
    code += "print(available(), tile_kernels(), bf16_max_rows())"
    off = run_python(code, {"FLEXMOE_CPU_TILES": "0"})
    assert off.returncode == 0 and off.stdout.split() == ["True", "False", "2"]
