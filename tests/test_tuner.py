"""The online plan tuner (``plan="auto"``) and the layer's cost model.

Unit tests drive ``Tuner`` with a fake cost model and fed times: which candidates it
measures, that the fastest measured one wins and is reused without searching, that a
new load bucket is searched, that drift re-tunes. The distributed tests run real
layers on gloo: ``"auto"`` computes the single-device layer exactly (outputs and
gradients, under extreme and Zipf skew), and every rank takes the same decisions.
"""

from __future__ import annotations

import logging

import pytest
import torch

from flexmoe import MoELayer, Plan, TunerConfig
from flexmoe.config import RerouteConfig
from flexmoe.planner import load_cluster
from flexmoe.planner.layer_cost import CostModel
from flexmoe.planner.tuner import Tuner, candidates_for

from .parallel_workers import Case, check_equivalence, run_tuner

PLAIN = Plan(r=1, reroute=False)
PIPE = Plan(r=1, d=2, reroute=False)
REROUTE = Plan(r=1, reroute="lla")
BOTH = Plan(r=1, d=2, reroute="lla")
GATHER = Plan(r=0, reroute=False)
ALL = [PLAIN, PIPE, REROUTE, BOTH, GATHER]


class FakeCost:
    """Predicted times by candidate; counts every call."""

    def __init__(self, times: dict[Plan, float]) -> None:
        self.times = times
        self.calls = 0

    def predict(self, c: Plan, *args: object) -> float:
        self.calls += 1
        return self.times[c]


def _tuner(predicted: dict[Plan, float], **config: object) -> tuple[Tuner, FakeCost]:
    cost = FakeCost(predicted)
    return Tuner(cost, TunerConfig(**config), ALL, PLAIN, experts_per_rank=2), cost  # type: ignore[arg-type]


SKEWED = [90, 10, 0, 0]  # rank 0 holds 100 of 100 rows: imbalance 2
EVEN = [30, 20, 25, 25]


def _candidate_of(plan: Plan, candidates: list[Plan]) -> Plan:
    """The candidate among ``candidates`` that a decision's ``plan`` runs."""
    return next(c for c in candidates if c == plan)


def _drive(tuner: Tuner, counts: list[int], measured: dict[Plan, float], steps: int) -> list:
    """``steps`` calls on ``counts``; each call's candidate "takes" ``measured[candidate]``."""
    decisions, previous = [], 0.0
    for _ in range(steps):
        d = tuner.choose(counts, 50, 2, 0.0, True, torch.float32, previous)
        decisions.append(d)
        candidate = _candidate_of(d.plan, list(measured))
        previous = measured[candidate]
    return decisions


def test_search_measures_the_best_predicted_and_plain_then_reuses_the_fastest():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    measured = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 7.0, BOTH: 6.5, GATHER: 20.0}
    tuner, _ = _tuner(predicted, measure_top=2, measure_steps=3)
    decisions = _drive(tuner, SKEWED, measured, 14)
    searched = [d.plan for d in decisions if d.phase == "search"]
    # The two best predicted (REROUTE, BOTH), then plain EP, three calls each, in that order.
    expected = [Plan(r=1, reroute="lla")] * 3 + [Plan(r=1, d=2, reroute="lla")] * 3
    assert searched == expected + [Plan(r=1, reroute=False)] * 3
    tuned = decisions[9:]
    assert all(d.phase == "tuned" for d in tuned)
    assert all(d.plan == Plan(r=1, d=2, reroute="lla") for d in tuned)  # fastest measured, not predicted
    assert tuned[0].predicted_s == 6.0 and decisions[1].previous_s == 7.0


def test_a_known_bucket_is_not_searched_again_and_a_new_one_is():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    measured = dict(predicted)
    tuner, cost = _tuner(predicted, measure_top=1, measure_steps=2)
    first = _drive(tuner, SKEWED, measured, 6)
    assert [d.phase for d in first] == ["search"] * 4 + ["tuned"] * 2
    calls = cost.calls
    again = _drive(tuner, SKEWED, measured, 3)
    assert all(d.phase == "tuned" for d in again)
    assert cost.calls - calls == 3  # only the chosen plan's prediction, reported in stats
    even = _drive(tuner, EVEN, measured, 5)
    assert even[0].phase == "search" and even[0].bucket != first[0].bucket
    assert len(tuner.winners) == 2


def test_under_skew_the_best_rerouting_plan_is_measured_even_if_ranked_low():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 15.0, BOTH: 16.0, GATHER: 8.0}  # a mis-ranking model
    measured = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 8.0}
    tuner, _ = _tuner(predicted, measure_top=2, measure_steps=2)
    decisions = _drive(tuner, SKEWED, measured, 9)  # GATHER, PIPE, PLAIN, then REROUTE
    assert [d.plan for d in decisions if d.phase == "search"][-2:] == [Plan(r=1, reroute="lla")] * 2
    assert decisions[-1].phase == "tuned" and decisions[-1].plan == Plan(r=1, reroute="lla")
    even, _ = _tuner(predicted, measure_top=2, measure_steps=2)
    searched = {d.plan for d in _drive(even, EVEN, measured, 7) if d.phase == "search"}
    assert not any(p.reroute for p in searched)  # balanced: rerouting is not forced into the search


def test_under_skew_each_rerouting_kind_gets_measured():
    shadow = Plan(r=1, reroute="shadow")
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 8.0, shadow: 12.0}
    measured = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 7.0, BOTH: 7.5, GATHER: 8.0, shadow: 4.0}
    cost = FakeCost(predicted)
    tuner = Tuner(cost, TunerConfig(measure_top=2, measure_steps=2), [*ALL, shadow], PLAIN, 2)  # type: ignore[arg-type]
    decisions = []
    previous = 0.0
    for _ in range(10):
        d = tuner.choose(SKEWED, 50, 2, 0.0, True, torch.float32, previous)
        decisions.append(d)
        previous = measured[_candidate_of(d.plan, list(measured))]
    searched = [d.plan.reroute for d in decisions if d.phase == "search"]
    # REROUTE and BOTH (best predicted), plain, then the best shadowing plan though ranked last.
    assert searched == ["lla"] * 4 + [False] * 2 + ["shadow"] * 2
    assert decisions[-1].phase == "tuned" and decisions[-1].plan == Plan(r=1, reroute="shadow")


def test_the_model_breaks_ties_within_the_noise_but_not_beyond():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    tie = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 10.15, BOTH: 12.0, GATHER: 20.0}  # 1.5 % apart
    tuner, _ = _tuner(predicted, measure_top=1, measure_steps=2)
    assert _drive(tuner, SKEWED, tie, 5)[-1].plan == Plan(r=1, reroute="lla")  # predicted faster
    beyond = dict(tie)
    beyond[REROUTE] = 10.8  # 8 % slower than plain: measurement decides
    tuner, _ = _tuner(predicted, measure_top=1, measure_steps=2)
    assert _drive(tuner, SKEWED, beyond, 5)[-1].plan == Plan(r=1, reroute=False)


def test_a_tie_in_both_measurement_and_prediction_goes_to_the_measured_fastest():
    predicted = {PLAIN: 10.0, PIPE: 12.0, REROUTE: 9.95, BOTH: 12.0, GATHER: 20.0}  # 0.5 % apart
    measured = {PLAIN: 10.0, PIPE: 12.0, REROUTE: 10.15, BOTH: 12.0, GATHER: 20.0}  # 1.5 % apart
    tuner, _ = _tuner(predicted, measure_top=1, measure_steps=2)
    assert _drive(tuner, SKEWED, measured, 5)[-1].plan == Plan(r=1, reroute=False)


def test_plain_expert_parallelism_wins_when_nothing_measures_faster():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    measured = {PLAIN: 10.0, PIPE: 11.0, REROUTE: 12.0, BOTH: 12.0, GATHER: 20.0}
    tuner, _ = _tuner(predicted, measure_top=2, measure_steps=2)
    decisions = _drive(tuner, SKEWED, measured, 8)
    assert decisions[-1].phase == "tuned" and decisions[-1].plan == Plan(r=1, reroute=False)


def test_drift_retunes(caplog):
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    measured = dict(predicted)
    tuner, _ = _tuner(predicted, measure_top=1, measure_steps=2, drift=0.3)
    with caplog.at_level(logging.INFO, logger="flexmoe.planner.tuner"):
        _drive(tuner, SKEWED, measured, 5)
        assert any("wins" in r.message for r in caplog.records)
        # The winner (REROUTE) becomes twice as slow: after a window of 5 calls, re-tune.
        slow = dict(measured)
        slow[REROUTE] = 10.0
        decisions = _drive(tuner, SKEWED, slow, 8)
    phases = [d.phase for d in decisions]
    assert "retune" in phases and phases[phases.index("retune") + 1] == "search"
    assert any("re-tuning" in r.message for r in caplog.records)


def test_drift_is_measured_from_the_winners_steady_state():
    predicted = {PLAIN: 10.0, PIPE: 9.0, REROUTE: 5.0, BOTH: 6.0, GATHER: 20.0}
    tuner, _ = _tuner(predicted, measure_top=1, measure_steps=2, drift=0.3)
    # Search (REROUTE wins with 5.0), then a steady state 40 % slower than the search
    # measured (within 2 * drift: it becomes the reference) with +-20 % noise around it.
    reroute_times = [5.0] * 5 + [7.0] * 5 + [5.6, 8.4, 7.0, 8.4, 5.6, 7.0, 8.4, 5.6]
    decisions = _drive_times(tuner, predicted, reroute_times)
    assert decisions[4].phase == "tuned" and decisions[4].plan == Plan(r=1, reroute="lla")
    assert all(d.phase == "tuned" for d in decisions[4:])
    # A sustained change of more than 30 % from that reference re-tunes.
    later = _drive_times(tuner, predicted, [9.8] * 6, previous=5.6)
    assert [d.phase for d in later].count("retune") == 1


def _drive_times(
    tuner: Tuner, measured: dict[Plan, float], reroute_times: list[float], previous: float = 0.0
) -> list:
    """One call per entry of ``reroute_times``: what REROUTE takes at that call; others ``measured``."""
    decisions = []
    for t in reroute_times:
        d = tuner.choose(SKEWED, 50, 2, 0.0, True, torch.float32, previous)
        decisions.append(d)
        previous = t if d.plan == Plan(r=1, reroute="lla") else measured[PLAIN]
    return decisions


def test_buckets_follow_imbalance_and_size():
    tuner, _ = _tuner({c: 1.0 for c in ALL})
    key = tuner.bucket(SKEWED, 2, 0.0, True, torch.float32)
    assert tuner.bucket([91, 9, 0, 0], 2, 0.0, True, torch.float32) == key  # same load, noise
    assert tuner.bucket(EVEN, 2, 0.0, True, torch.float32) != key
    assert tuner.bucket([x * 4 for x in SKEWED], 2, 0.0, True, torch.float32) != key
    assert tuner.bucket(SKEWED, 2, 0.0, False, torch.float32) != key  # inference is its own bucket
    assert tuner.imbalance(SKEWED) == 2.0 and tuner.imbalance([0, 0, 0, 0]) == 1.0


def test_candidates():
    config, rc = TunerConfig(pipelining=(1, 2)), RerouteConfig()
    whole, plain = candidates_for([0, 1], 1, False, False, config, rc)
    shadows = {Plan(r=1, d=d, reroute="shadow") for d in (1, 2)}
    assert plain == PLAIN and set(whole) == {GATHER, PLAIN, PIPE, REROUTE, BOTH} | shadows
    lla, _ = candidates_for([0, 1], 1, False, False, config, RerouteConfig(kinds=("lla",)))
    assert set(lla) == {GATHER, PLAIN, PIPE, REROUTE, BOTH}
    off, _ = candidates_for([0, 1], 1, False, False, config, RerouteConfig(enabled=False))
    assert not any((c.reroute_kind is not None) for c in off)
    sharded, plain = candidates_for([0, 1, 2], 2, True, True, config, rc)
    assert plain == Plan(r=2, reroute=False) and Plan(r=1, d=2, exchange="2dh", reroute=False) in sharded
    assert not any((c.reroute_kind is not None) for c in sharded)


def test_tuner_config_validation():
    with pytest.raises(ValueError, match="measure_steps"):
        TunerConfig(measure_steps=0)
    with pytest.raises(ValueError, match="pipelining"):
        TunerConfig(pipelining=())
    with pytest.raises(TypeError, match="tuner"):
        MoELayer(8, 8, 2, tuner="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plan"):
        MoELayer(8, 8, 2, plan="fastest")
    layer = MoELayer(8, 8, 2, plan="auto")  # one device: "auto" is the only plan there is
    assert layer(torch.randn(3, 8)).shape == (3, 8) and layer.stats is not None
    assert layer.stats.plan == Plan() and layer.tuner is None


def test_cost_model_prefers_rerouting_only_when_compute_dominates():
    from flexmoe import MoEConfig

    cluster = load_cluster("a100-80gb-hdr200")
    hot = [4096 * 8, 0, 0, 0, 0, 0, 0, 0]  # everything on rank 0 of 4

    def times(dim: int, hidden: int, tokens: int) -> tuple[float, float]:
        cost = CostModel(cluster, MoEConfig(dim=dim, hidden_dim=hidden, num_experts=8, top_k=1), 4, 4)
        rows = [x * tokens // 4096 for x in hot]
        args = (rows, tokens * 4, 1, 0.0, True, torch.bfloat16)
        return cost.predict(Plan(r=1, reroute=False), *args), cost.predict(Plan(r=1, reroute="lla"), *args)

    plain, rerouted = times(1024, 4096, 65536)  # many rows per expert: rerouting pays
    assert rerouted < 0.6 * plain
    plain, rerouted = times(4096, 16384, 16)  # a handful of rows, big weights: it does not
    assert rerouted > plain


def test_cost_model_scores_the_layers_own_plan_with_its_held_replicas():
    from flexmoe import MoEConfig
    from flexmoe.planner.rerouting import expected_rerouting as planner_plan
    from flexmoe.planner.rerouting import plan_rerouting as layer_plan
    from flexmoe.planner.rerouting import summarize

    cluster = load_cluster("a100-80gb-hdr200")
    W, tokens = 4, 4 * 4096
    counts = [tokens, 0, 0, 0, 0, 0, 0, 0]  # top-1, every row on expert 0 (rank 0)
    cost = CostModel(cluster, MoEConfig(dim=1024, hidden_dim=4096, num_experts=8, top_k=1), W, 4)
    args = (counts, tokens, 1, 0.0, False, torch.bfloat16)
    option = Plan(r=1, reroute="lla")
    # Sources spread evenly: the summary of the layer's plan is the simulator's own plan.
    plan = layer_plan(counts, W)
    ours, simulators = summarize(plan, counts, W), planner_plan(counts, W)
    assert ours.transfers == simulators.transfers and ours.rows_R.tolist() == simulators.rows_R.tolist()
    assert cost.predict(option, *args, rerouting_plan=ours) == cost.predict(option, *args)
    # Ranks 1-3 hold replicas of expert 0: the same rows, no copy travels (inference).
    held_plan = layer_plan(counts, W, held=[[], [0], [0], [0]])
    assert held_plan.rows_per_rank == plan.rows_per_rank and not held_plan.transfers
    with_replicas = cost.predict(option, *args, rerouting_plan=summarize(held_plan, counts, W))
    assert with_replicas < cost.predict(option, *args)
    # A training step sends them anyway (their gradients go back to the owner).
    every = [(e, p) for p, copies in enumerate(held_plan.copies) for e in copies]
    sent = summarize(held_plan, counts, W, transfers=every)
    assert sent.num_copies == 3 and sent.transfers_T2.tolist() == [[0, 1], [0, 2], [0, 3]]


# --- distributed ----------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_auto_equals_single_device_under_skew(rank_pools, world):
    E = 2 * world
    auto = ["auto"] * 14  # through the search and into the tuned phase
    cases = [
        Case(num_experts=E, top_k=1, skew="one", tokens_per_rank=[24] * world, plans=auto, seed=11),
        Case(num_experts=E, top_k=2, skew="zipf", tokens_per_rank=[24] * world, plans=auto, seed=12),
        Case(num_experts=E, top_k=2, skew="never", tokens_per_rank=[24] * world, plans=auto, seed=13),
    ]
    if world == 4:  # sharded experts (r = 1, 2, 4 and 0 to choose from)
        sharded = Case(num_experts=2, top_k=1, tokens_per_rank=[8, 0, 16, 8], plans=auto, seed=14)
        sharded.load_balance_weight = 0.0  # the ranks' mean loss is the global one only for equal batches
        cases.append(sharded)
    checked = rank_pools.run(check_equivalence, world, cases, timeout=300)
    assert checked == [14 * len(cases)] * world


@pytest.mark.distributed
def test_auto_searches_each_bucket_once_and_agrees_on_every_rank(rank_pools):
    # drift off: millisecond steps vary by more than 30 % here; drift has its own unit test
    tuner = TunerConfig(
        cluster="a100-80gb-hdr200", measure_top=1, measure_steps=2, pipelining=(1, 2), drift=100.0
    )
    schedule = ["one"] * 9 + ["uniform"] * 6 + ["one"] * 3
    rows = rank_pools.run(run_tuner, 2, 4, schedule, tuner, timeout=120)[0]
    phases = [r[0] for r in rows]
    # Skewed bucket: 2 to 4 candidates (the best plan of each rerouting kind joins if
    # none of its kind is among them) x 2 calls, then tuned; a uniform bucket: its own
    # search; back to the skewed load: its winner, no search.
    n = phases.index("tuned")
    assert n in (4, 6, 8) and phases[:n] == ["search"] * n and phases[n:9] == ["tuned"] * (9 - n), phases
    assert phases[9] == "search" and rows[9][2] != rows[0][2]
    assert phases[15:] == ["tuned"] * 3 and rows[15][1] == rows[8][1]
    assert all(r[4] > 0 for r in rows[1:])  # every call after the first got the previous time
    assert all(r[3] > 0 for r in rows)
