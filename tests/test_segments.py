"""The segment runner: threaded per-expert GEMMs give the same results as the serial loop."""

import threading
import time

import pytest
import torch

from flexmoe.experts import kernels
from flexmoe.experts import segments as segments_module
from flexmoe.experts.backends import grouped_ffn
from flexmoe.experts.segments import SERIAL_16BIT_ROWS, _balances, for_each_segment, segments_of

OPENMP = "OpenMP" in torch.__config__.parallel_info()


def test_segments_of_skips_empty_experts():
    assert segments_of([2, 0, 3, 0]) == [(0, 0, 2), (2, 2, 5)]


def test_balance_rule():
    even = segments_of([10] * 8)
    assert _balances(even, 2)
    hot = segments_of([100, 1, 1, 1, 1])
    assert not _balances(hot, 2)


def test_every_segment_runs_once_in_parallel(two_threads):
    segments = segments_of([5] * 16)
    seen = []
    for_each_segment(segments, lambda e, s, t: seen.append((e, s, t)), torch.device("cpu"))
    assert sorted(seen) == segments
    assert torch.get_num_threads() == 2  # restored


@pytest.mark.parametrize("team", [True, False], ids=["openmp-team", "python-pool"])
@pytest.mark.parametrize(
    ("dtype", "rows", "serial_rows", "threaded_on_pool"),
    [
        (torch.float32, 32, SERIAL_16BIT_ROWS, True),
        (torch.bfloat16, 32, SERIAL_16BIT_ROWS, False),  # large 16-bit segments: one at a time
        (torch.float16, 32, SERIAL_16BIT_ROWS, False),
        (torch.bfloat16, 4, SERIAL_16BIT_ROWS, True),  # decode-sized ones still use the threads
        (torch.bfloat16, 4, 0, False),  # unless the caller asks (the packed weights)
    ],
)
def test_which_segments_are_spread_over_threads(
    two_threads, monkeypatch, team, dtype, rows, serial_rows, threaded_on_pool
):
    """On the OpenMP team every balanced set of segments is spread; the pool keeps the 16-bit rule."""
    if team and not (kernels.available() and OPENMP):
        pytest.skip("no kernel library or no OpenMP here: the Python pool is the only path")
    if not team:
        monkeypatch.setattr(segments_module, "on_team", lambda work, threads: False)
    segments = segments_of([rows] * 16)
    threads = set()

    def work(e: int, s: int, t: int) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.002)  # long enough for the other thread to take a segment too

    for_each_segment(segments, work, torch.device("cpu"), dtype, serial_16bit_rows=serial_rows)
    assert (len(threads) > 1) is (team or threaded_on_pool)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[7, 9, 8, 6, 7, 8, 9, 6], [40, 1, 1, 1, 1, 1]])
def test_threaded_fused_matches_loop(two_threads, activation, counts):
    torch.manual_seed(0)
    E, D, F = len(counts), 16, 24
    H = 2 * F if activation == "swiglu" else F
    w_in = torch.randn(E, H, D, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(E, D, F, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    rw = torch.rand(sum(counts), dtype=torch.float64, requires_grad=True)
    grad = torch.randn(sum(counts), D, dtype=torch.float64)
    results = []
    for backend in ("loop", "fused"):
        y = grouped_ffn(backend, x, counts, w_in, w_out, None, None, activation, rw)
        grads = torch.autograd.grad(y, (x, w_in, w_out, rw), grad)
        results.append((y, *grads))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref)


def test_threaded_fused_without_grad(two_threads):
    torch.manual_seed(0)
    counts = [3] * 12
    w_in = torch.randn(12, 16, 8)
    w_out = torch.randn(12, 8, 16)
    x = torch.randn(36, 8)
    with torch.no_grad():
        fused = grouped_ffn("fused", x, counts, w_in, w_out, None, None, "relu")
    loop = grouped_ffn("loop", x, counts, w_in, w_out, None, None, "relu")
    torch.testing.assert_close(fused, loop)


def test_threaded_fused_in_inference_mode(two_threads):
    torch.manual_seed(0)
    counts = [3] * 12
    w_in, w_out, x = torch.randn(12, 16, 8), torch.randn(12, 8, 16), torch.randn(36, 8)
    with torch.inference_mode():
        fused = grouped_ffn("fused", x, counts, w_in, w_out, None, None, "relu")
    torch.testing.assert_close(fused, grouped_ffn("loop", x, counts, w_in, w_out, None, None, "relu"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_inference_path_matches_loop(threads, activation, bias):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        counts = [3, 0, 1, 5, 2, 4, 0, 2, 3, 1]
        E, D, F = len(counts), 8, 12
        H = 2 * F if activation in ("swiglu", "geglu") else F
        w_in, w_out = torch.randn(E, H, D), torch.randn(E, D, F)
        b_in, b_out = (torch.randn(E, H), torch.randn(E, D)) if bias else (None, None)
        x, rw = torch.randn(sum(counts), D), torch.rand(sum(counts))
        with torch.no_grad():
            fused = grouped_ffn("fused", x, counts, w_in, w_out, b_in, b_out, activation, rw)
            loop = grouped_ffn("loop", x, counts, w_in, w_out, b_in, b_out, activation, rw)
        torch.testing.assert_close(fused, loop)
    finally:
        torch.set_num_threads(before)


def test_fused_second_backward_raises_clearly():
    torch.manual_seed(0)
    w_in = torch.randn(2, 8, 4, requires_grad=True)
    w_out = torch.randn(2, 4, 8, requires_grad=True)
    y = grouped_ffn("fused", torch.randn(5, 4), [2, 3], w_in, w_out, None, None, "relu")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backend='loop'"):
        y.sum().backward()


def test_workspace_never_pools_shared_storage():
    from flexmoe.workspace import Workspace

    pool = Workspace()
    buffer = pool.take((4, 4), torch.float32, torch.device("cpu"))
    view = buffer[1:]  # another tensor shares the storage
    pool.give(buffer)
    assert pool.pooled_bytes() == 0
    del view
    pool.give(buffer)
    assert pool.pooled_bytes() == 64
    again = pool.take((2, 8), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == buffer.data_ptr() and pool.pooled_bytes() == 0
