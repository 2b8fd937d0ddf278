"""Routing traces: recording a model's routing, reading it back (also after a crash), forcing
a layer to route a recorded step exactly, and replaying a trace in the simulator."""

import gzip
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import flexmoe
from flexmoe import Plan
from flexmoe.cli import main
from flexmoe.planner import MoEWorkload, load_cluster
from flexmoe.planner.replay import format_trace_simulation, simulate_trace
from flexmoe.planner.trace import RoutingTrace, RoutingTraceWriter, TraceRecord, read_routing_trace
from flexmoe.tools.recorder import RoutingRecorder
from flexmoe.tools.replay import expert_ids_from_counts, force_routing, routing_from_counts
from tests.reference import reference_params, routed_expert


def _model(num_experts: int = 4, top_k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        flexmoe.MoELayer(16, 32, num_experts, top_k),
        nn.Linear(16, 16),
        flexmoe.MoELayer(16, 32, num_experts, top_k),
    )


# --- recording -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_recorded_counts_equal_the_layers_stats(tmp_path, suffix):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / f"trace{suffix}"
    expected: dict[tuple[int, str], list[int]] = {}
    with RoutingRecorder(model, path, optimizer=optimizer, meta={"model": "toy"}) as recorder:
        assert recorder.layer_names == ["0", "2"]
        for step in range(3):
            for micro in range(2):  # gradient accumulation: both micro-batches count
                model(torch.randn(5 + micro, 16)).sum().backward()
                for name in ("0", "2"):
                    counts = getattr(model, name).stats.routed_per_expert.tolist()
                    old = expected.get((step, name), [0] * 4)
                    expected[(step, name)] = [a + b for a, b in zip(old, counts, strict=True)]
            model.eval()
            model(torch.randn(7, 16))  # an evaluation: not recorded
            model.train()
            optimizer.step()  # ends the step: one record per layer
            optimizer.zero_grad()
        model(torch.randn(3, 16))  # after the last step: dropped by close()
    trace = read_routing_trace(path)
    assert (trace.num_experts, trace.top_k, trace.world_size, trace.meta) == (4, 2, 1, {"model": "toy"})
    assert not trace.truncated and trace.layers == ["0", "2"]
    assert {(r.step, r.layer): list(r.counts) for r in trace.records} == expected
    assert all(r.tokens == 11 and sum(r.counts) == 22 for r in trace.records)
    if suffix == ".jsonl":  # the documented format, line by line
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[0]["format"] == "flexmoe-routing-trace" and lines[0]["version"] == 1
        assert set(lines[1]) == {"step", "layer", "tokens", "counts"}


def test_recorder_steps_explicitly_and_skips_layers_that_did_not_run(tmp_path):
    model = _model()
    recorder = RoutingRecorder(model, tmp_path / "t.jsonl", start_step=10)
    model(torch.randn(4, 16))
    recorder.step()
    model[0](torch.randn(4, 16))  # only the first layer runs
    recorder.step(20)
    recorder.step()  # nothing ran: no record
    model(torch.randn(4, 16))
    recorder.step()
    recorder.close()
    model(torch.randn(4, 16))  # the hooks are gone
    trace = read_routing_trace(tmp_path / "t.jsonl")
    assert [(r.step, r.layer) for r in trace.records] == [
        (10, "0"),
        (10, "2"),
        (20, "0"),
        (22, "0"),
        (22, "2"),
    ]


def test_recorder_on_another_rank_writes_nothing(tmp_path):
    model = _model()
    with RoutingRecorder(model, tmp_path / "t.jsonl", rank=1, world_size=2) as recorder:
        model(torch.randn(4, 16))
        recorder.step()
    assert not (tmp_path / "t.jsonl").exists()


def test_recorder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"no flexmoe\.MoELayer"):
        RoutingRecorder(nn.Linear(2, 2), tmp_path / "t.jsonl")
    mixed = nn.Sequential(flexmoe.MoELayer(8, 8, 4, 2), flexmoe.MoELayer(8, 8, 8, 2))
    with pytest.raises(ValueError, match=r"same \(num_experts, top_k\).*0 \(4, 2\), 1 \(8, 2\)"):
        RoutingRecorder(mixed, tmp_path / "t.jsonl")
    layer = flexmoe.MoELayer(8, 8, 4, 2)
    with RoutingRecorder(layer, tmp_path / "t.jsonl"), pytest.raises(ValueError, match="top_k=1"):
        layer(torch.randn(3, 8), top_k=1)
    with pytest.raises(ValueError, match="start_step"):
        RoutingRecorder(layer, tmp_path / "u.jsonl", start_step=-1)


# --- the file: errors, crashes, resumes -------------------------------------------------------
def test_writer_rejects_counts_that_cannot_be_a_step(tmp_path):
    with RoutingTraceWriter(tmp_path / "t.jsonl", num_experts=4, top_k=2) as writer:
        with pytest.raises(ValueError, match="num_experts=4 entries, got 3"):
            writer.write(0, "moe", [2, 2, 2])
        with pytest.raises(ValueError, match=r"tokens\*top_k=3\*2=6, got 8"):
            writer.write(0, "moe", [2, 2, 2, 2], tokens=3)
        with pytest.raises(ValueError, match=">= 0"):
            writer.write(0, "moe", [4, 4, -1, 1])
        with pytest.raises(ValueError, match="multiple of top_k=2"):
            writer.write(0, "moe", [1, 2, 0, 0])
    with pytest.raises(ValueError, match="top_k must be <= num_experts=2"):
        RoutingTraceWriter(tmp_path / "u.jsonl", num_experts=2, top_k=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "flexmoe-routing-trace", "num_experts": 2, "top_k": 1}\n{"step": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a trace record"):
        read_routing_trace(bad)


def _write_steps(path, steps, close=True):
    writer = RoutingTraceWriter(path, num_experts=3, top_k=2, meta={"run": 1})
    for step in steps:
        writer.write(step, "moe", [step % 3 + 1, 2, 3 - step % 3], flush=False)
        writer.flush()
    if close:
        writer.close()
    return writer


@settings(max_examples=40)
@given(st.data())
def test_a_file_cut_anywhere_reads_as_its_complete_steps(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("cut")
    for suffix in (".jsonl", ".jsonl.gz"):
        whole = folder / f"whole{suffix}"
        whole.unlink(missing_ok=True)
        writer = _write_steps(whole, range(6), close=False)  # the run "crashes": never closed
        raw = whole.read_bytes()
        writer.close()
        cut = data.draw(st.integers(0, len(raw)), label=f"cut {suffix}")
        part = folder / f"part{suffix}"
        part.write_bytes(raw[:cut])
        try:
            trace = read_routing_trace(part)
        except ValueError as error:  # cut inside the header: nothing to read
            assert "not a flexmoe routing trace" in str(error)
            continue
        steps = [r.step for r in trace.records]
        assert steps == list(range(len(steps)))
        if cut == len(raw):
            assert steps == list(range(6)) and (suffix == ".jsonl.gz" or not trace.truncated)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_appending_after_a_crash_or_a_resume_repairs_the_file(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    writer = _write_steps(path, range(5), close=False)  # crash: the gzip stream has no end
    raw = path.read_bytes()
    writer.close()
    path.write_bytes(raw[: len(raw) - 3])  # and the last bytes never reached the disk
    crashed = read_routing_trace(path)
    assert crashed.truncated and len(crashed.records) >= 3
    before = [r.step for r in crashed.records]
    _write_steps(path, [5, 6])  # appending first drops the cut tail
    trace = read_routing_trace(path)
    assert [r.step for r in trace.records] == [*before, 5, 6] and not trace.truncated
    # A run resumed from its step-2 checkpoint records steps 3, 4, ... again.
    writer = RoutingTraceWriter(path, num_experts=3, top_k=2, keep_before_step=3)
    writer.write(3, "moe", [1, 1, 2])
    writer.close()
    trace = read_routing_trace(path)
    assert [r.step for r in trace.records] == [0, 1, 2, 3] and not trace.truncated
    assert trace.meta == {"run": 1}
    if suffix == ".jsonl.gz":
        with gzip.open(path, "rt") as file:  # a plain gzip file again
            assert len(file.read().splitlines()) == 5


# --- forced routing ---------------------------------------------------------------------------
@st.composite
def routed_counts(draw):
    """Counts of a random (possibly very skewed) routing: E, K, T and counts [E]."""
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 40))
    skew = draw(st.lists(st.floats(0, 1e4), min_size=E, max_size=E))
    weights = torch.tensor(skew, dtype=torch.float64) + 1e-9
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    counts = torch.zeros(E, dtype=torch.int64)
    for _ in range(T):
        counts[torch.multinomial(weights, K, replacement=False, generator=generator)] += 1
    return E, K, T, counts.tolist()


@settings(max_examples=150)
@given(routed_counts(), st.one_of(st.none(), st.integers(0, 100)))
def test_expert_ids_reproduce_the_counts_exactly(case, seed):
    E, K, T, counts = case
    ids_TK = expert_ids_from_counts(counts, K, T, num_experts=E, seed=seed)
    assert ids_TK.shape == (T, K) and ids_TK.dtype == torch.int64
    assert torch.bincount(ids_TK.flatten(), minlength=E).tolist() == counts
    if T:
        assert bool((ids_TK.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct experts per token
    again = expert_ids_from_counts(torch.tensor(counts), K, seed=seed) if T else ids_TK
    assert torch.equal(again, ids_TK)  # reproducible; num_tokens defaults to sum / K


@settings(max_examples=25)
@given(routed_counts())
def test_forced_routing_gives_the_layer_the_recorded_counts(case):
    E, K, T, counts = case
    layer = flexmoe.MoELayer(8, 8, E, K)
    with force_routing(layer, expert_ids_from_counts(counts, K, T)):
        layer(torch.randn(T, 8))
    assert layer.stats is not None and layer.stats.routed_per_expert.tolist() == counts


@pytest.mark.parametrize(
    "router", ["softmax", flexmoe.RouterConfig(kind="sigmoid", routed_scaling_factor=2.5)]
)
@pytest.mark.parametrize("top_k", [1, 3])
def test_forced_routing_equals_a_reference_with_those_ids(router, top_k):
    torch.manual_seed(1)
    layer = flexmoe.MoELayer(16, 24, 6, top_k, router=router, load_balance_weight=0.0)
    counts = [9, 0, 1, 5, 3, 0] if top_k == 1 else [9, 9, 1, 5, 3, 0]
    T = sum(counts) // top_k
    ids_TK = expert_ids_from_counts(counts, top_k, seed=3)
    x_TD = torch.randn(T, 16, requires_grad=True)
    with force_routing(layer, ids_TK):
        y_TD = layer(x_TD)
    y_TD.square().sum().backward()

    params = reference_params(layer)
    expert = routed_expert(layer.config, params)
    x64_TD = x_TD.detach().double()
    logits_TE = x64_TD @ params["router.weight"].T
    scores_TE = logits_TE.sigmoid() if layer.config.router.kind == "sigmoid" else logits_TE.softmax(-1)
    weights_TK = scores_TE.gather(1, ids_TK)
    if top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    weights_TK = weights_TK * layer.config.router.routed_scaling_factor
    rows = [
        sum(weights_TK[t, k] * expert(int(ids_TK[t, k]), x64_TD[t]) for k in range(top_k)) for t in range(T)
    ]
    reference_TD = torch.stack(rows)
    torch.testing.assert_close(y_TD.detach().double(), reference_TD.detach(), rtol=1e-4, atol=1e-5)
    reference_TD.square().sum().backward()
    # The forced weights are differentiable: the router gets the reference's gradient.
    assert layer.router.weight.grad is not None
    torch.testing.assert_close(
        layer.router.weight.grad.double(), params["router.weight"].grad, rtol=1e-4, atol=1e-6
    )
    assert layer.stats.routed_per_expert.tolist() == counts


def test_forced_routing_errors_name_the_argument():
    layer = flexmoe.MoELayer(8, 8, 4, 2)
    with pytest.raises(ValueError, match="counts must have num_experts=4 entries, got 3"):
        expert_ids_from_counts([2, 2, 2], 2, num_experts=4)
    with pytest.raises(ValueError, match=r"num_tokens\*top_k=4\*2=8, got 6"):
        expert_ids_from_counts([2, 2, 2, 0], 2, 4)
    with pytest.raises(ValueError, match="<= num_tokens=3"):
        expert_ids_from_counts([4, 2, 0, 0], 2, 3)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        expert_ids_from_counts([4, 4, -1, 1], 2)
    with pytest.raises(ValueError, match="counts must be a 1-D sequence of integers"):
        expert_ids_from_counts([1.5, 0.5], 1)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=2\]"):
        expert_ids_from_counts([1, 1], 3)
    ids = expert_ids_from_counts([2, 2, 2, 2], 2)
    with (
        pytest.raises(TypeError, match=r"layer must be a flexmoe\.MoELayer"),
        force_routing(nn.Linear(8, 8), ids),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"values must be in \[0, num_experts=4\)"),
        force_routing(layer, ids + 2),
    ):
        pass
    with pytest.raises(ValueError, match="distinct experts"), force_routing(layer, torch.tensor([[0, 0]])):
        pass
    with pytest.raises(ValueError, match="2-D integer tensor"), force_routing(layer, ids.float()):
        pass
    with force_routing(layer, ids):
        with pytest.raises(ValueError, match="for 4 tokens, top-2; the layer was called with 5 tokens"):
            layer(torch.randn(5, 8))
        with pytest.raises(ValueError, match="called with 4 tokens, top-1"):
            layer(torch.randn(4, 8), top_k=1)
    layer(torch.randn(5, 8))  # the hook is gone after the block


# --- a per-token number of experts --------------------------------------------------------------
@st.composite
def variable_k_counts(draw):
    """A random routing in which each token uses 0..K experts: E, K, counts [E], histogram [K + 1]."""
    E = draw(st.integers(1, 10))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 30))
    skew = draw(st.lists(st.floats(0, 1e4), min_size=E, max_size=E))
    weights = torch.tensor(skew, dtype=torch.float64) + 1e-9
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    counts, hist = torch.zeros(E, dtype=torch.int64), [0] * (K + 1)
    for _ in range(T):
        m = int(torch.randint(0, K + 1, (), generator=generator))
        hist[m] += 1
        if m:
            counts[torch.multinomial(weights, m, replacement=False, generator=generator)] += 1
    return E, K, counts.tolist(), hist


@settings(max_examples=150)
@given(variable_k_counts(), st.one_of(st.none(), st.integers(0, 100)))
def test_variable_k_routing_reproduces_counts_and_experts_per_token(case, seed):
    E, K, counts, hist = case
    ids_TK, valid_TK = routing_from_counts(counts, K, hist, num_experts=E, seed=seed)
    T = sum(hist)
    assert ids_TK.shape == valid_TK.shape == (T, K) and valid_TK.dtype == torch.bool
    assert torch.bincount(ids_TK[valid_TK], minlength=E).tolist() == counts
    assert torch.bincount(valid_TK.sum(1), minlength=K + 1).tolist() == hist
    if T and K > 1:
        assert bool((ids_TK.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct, unused slots too
        # the used slots come first, as top-p routing gives them
        assert bool((valid_TK[:, :-1] | ~valid_TK[:, 1:]).all())
    again = routing_from_counts(torch.tensor(counts), K, torch.tensor(hist), seed=seed)
    assert torch.equal(again[0], ids_TK) and torch.equal(again[1], valid_TK)


def test_variable_k_routing_refuses_impossible_counts():
    with pytest.raises(ValueError, match=r"routed assignments of experts_per_token \(3\), got 4"):
        routing_from_counts([2, 2], 2, [0, 1, 1])
    with pytest.raises(ValueError, match=r"experts_per_token must hold top_k \+ 1 = 3 counts"):
        routing_from_counts([2, 2], 2, [0, 4])
    with pytest.raises(ValueError, match="must each be <= num_tokens=2"):
        routing_from_counts([3, 1], 2, [0, 0, 2])


@pytest.mark.parametrize("zero_experts", [(), ("skip", "constant")])
def test_trace_of_variable_k_records_and_replays_the_same_counts(tmp_path, zero_experts):
    """Top-p routing (and zero-computation experts) recorded, read back and replayed in a fresh
    layer: the same counts, the same histogram of experts per token, step by step."""
    torch.manual_seed(0)
    router = flexmoe.RouterConfig(top_p=0.6)
    model = nn.Sequential(flexmoe.MoELayer(16, 32, 6, 3, router=router, zero_experts=zero_experts))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with RoutingRecorder(model, tmp_path / "t.jsonl", optimizer=optimizer) as recorder:
        for _ in range(3):
            counts, hist = torch.zeros(6, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
            for micro in range(2):
                model(torch.randn(7 + micro, 16)).sum().backward()
                stats = model[0].stats
                counts += stats.routed_per_expert
                hist += stats.experts_per_token
            expected.append((counts.tolist(), hist.tolist()))
            optimizer.step()
        assert recorder.layer_names == ["0"]
    trace = read_routing_trace(tmp_path / "t.jsonl")
    assert [(list(r.counts), list(r.experts_per_token)) for r in trace.steps()] == expected
    assert all(r.tokens == 15 and r.mean_experts_per_token < 3 for r in trace.records)
    replayed = flexmoe.MoELayer(16, 32, 6, 3)
    for record in trace.steps():
        ids_TK, valid_TK = routing_from_counts(record.counts, trace.top_k, record.experts_per_token)
        with force_routing(replayed, ids_TK, valid_TK):
            replayed(torch.randn(record.tokens, 16))
        stats = replayed.stats
        assert stats.routed_per_expert.tolist() == list(record.counts)
        assert stats.experts_per_token.tolist() == list(record.experts_per_token)


def test_writer_checks_the_experts_per_token_histogram(tmp_path):
    with RoutingTraceWriter(tmp_path / "t.jsonl", num_experts=4, top_k=2) as writer:
        writer.write(0, "moe", [1, 2, 0, 1], experts_per_token=[1, 2, 1])  # 4 tokens, 4 routed
        with pytest.raises(ValueError, match=r"routed assignments of experts_per_token \(4\), got 5"):
            writer.write(1, "moe", [2, 2, 0, 1], experts_per_token=[1, 2, 1])
        with pytest.raises(ValueError, match="experts_per_token must sum to tokens=5, got 4"):
            writer.write(1, "moe", [1, 2, 0, 1], 5, experts_per_token=[1, 2, 1])
    (record,) = read_routing_trace(tmp_path / "t.jsonl").records
    assert record.tokens == 4 and record.experts_per_token == (1, 2, 1)


def test_simulate_trace_prices_a_variable_k_step_by_its_routed_rows():
    cluster = load_cluster("a100-80gb-hdr200")
    workload = MoEWorkload(dim=1024, hidden_dim=1024, num_experts=8, top_k=2, tokens_per_device=4096)
    trace = RoutingTrace(num_experts=8, top_k=2)
    trace.records.append(TraceRecord(0, "moe", 2048, (512,) * 8))  # top-2: 4096 routed
    half = (256,) * 8  # the same shape, one expert per token on average
    trace.records.append(TraceRecord(1, "moe", 2048, half, experts_per_token=(512, 1024, 512)))
    sim = simulate_trace(cluster, workload, trace, 8, plans=[Plan(r=1)])
    fixed, variable = sim.times("r=1 d=1 flat")
    assert variable < fixed
    top1 = MoEWorkload(dim=1024, hidden_dim=1024, num_experts=8, top_k=1, tokens_per_device=4096)
    one = simulate_trace(cluster, top1, trace, 8, plans=[Plan(r=1)]).times("r=1 d=1 flat")[0]
    assert variable == pytest.approx(one, rel=0.05)  # the rows of top-1 (metadata aside)


# --- the simulator ----------------------------------------------------------------------------
def _skewed_trace() -> RoutingTrace:
    trace = RoutingTrace(num_experts=8, top_k=2)
    rng = np.random.default_rng(0)
    for step in range(6):
        hot = 1.0 + step  # ever hotter expert 0 (at most 6/13 of the slots: <= the tokens)
        share = np.array([hot, *rng.uniform(0.5, 1.5, 7)])
        counts = np.floor(share / share.sum() * 4096).astype(int)
        counts[1] += 4096 - counts.sum()
        trace.records.append(TraceRecord(step, "moe", 2048, tuple(int(c) for c in counts)))
    return trace


def test_simulate_trace_predicts_every_step():
    cluster = load_cluster("a100-80gb-hdr200")
    workload = MoEWorkload(dim=1024, hidden_dim=1024, num_experts=8, top_k=2, tokens_per_device=4096)
    sim = simulate_trace(cluster, workload, _skewed_trace(), 8)
    S, P = sim.times_SP.shape
    assert S == 6 and len(sim.plans) == P and np.all(np.isfinite(sim.times_SP))
    assert sim.steps == list(range(6)) and np.all(np.diff(sim.load_max_over_mean_S) > 0)
    plain = sim.times("r=1 d=1 flat")
    assert np.all(np.diff(plain) > 0)  # a hotter expert, a slower plain-EP step
    best = sim.per_step_best_S
    adaptive = [p for p, c in enumerate(sim.plans) if isinstance(c, Plan)]
    assert np.allclose(best, sim.times_SP[:, adaptive].min(axis=1))
    rows = {r["plan"]: r for r in sim.summary()}
    assert rows["r=1 d=1 flat"]["median_s"] == pytest.approx(np.median(plain))
    assert rows["r=1 d=1 flat"]["p90_s"] == pytest.approx(np.percentile(plain, 90))
    assert rows["per-step best"]["median_s"] <= min(r["median_s"] for r in rows.values() if not r["static"])
    assert sum(r["best_steps"] for r in rows.values() if r["plan"] != "per-step best") >= 6
    text = format_trace_simulation(sim, top=3)
    assert "per-step best" in text and "static cf=1" in text and "layer moe: 6 steps" in text
    with pytest.raises(ValueError, match="num_experts=8, the workload 4"):
        simulate_trace(cluster, MoEWorkload(dim=8, hidden_dim=8, num_experts=4), _skewed_trace(), 4)


def test_flexmoe_plan_per_step(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    with RoutingTraceWriter(path, num_experts=8, top_k=2) as writer:
        for record in _skewed_trace().records:
            writer.write(record.step, "blocks.0.moe", record.counts)
    out_json = tmp_path / "out.json"
    main(
        [
            "plan",
            "--load",
            f"trace:{path}",
            "--per-step",
            "--devices",
            "8",
            "--top",
            "2",
            "--json",
            str(out_json),
        ]
    )
    out = capsys.readouterr().out
    assert "8 experts" in out and "layer blocks.0.moe: 6 steps" in out and "per-step best" in out
    result = json.loads(out_json.read_text())
    assert result["steps"] == list(range(6)) and len(result["step_times_s"]["r=1 d=1 flat"]) == 6
    with pytest.raises(SystemExit, match="--per-step needs --load trace"):
        main(["plan", "--per-step"])
    with pytest.raises(SystemExit, match="not in the trace"):
        main(["plan", "--load", f"trace:{path}:nope", "--per-step"])
