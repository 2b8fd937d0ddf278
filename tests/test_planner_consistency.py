"""The cost model against measured gloo runs on this machine (the distributed benchmark's cases).

For ``benchmarks/parallel.py``'s layer (dim 256, hidden 512, 8 experts, top-2, 512 tokens
per rank, fp32, 2 ranks per "node") on 2 and 4 local processes, every benchmark plan
(``r``, ``d`` in {1, 2, 4}, flat and 2DH) is timed, and ``flexmoe calibrate``'s probes run
on the same workers between the rounds, so that this machine's description comes from
the same minutes (the machine is shared: its speed moves by 2x within a minute). The
simulator, given that description and the routed counts of the step, must predict:

- every plan's step time within 30 % of the measured median over rounds, and
- the same best plan: the plan it ranks first is the measured best, or measures within
  15 % of it (closer than the run-to-run spread of one plan's median here: a tie).

The machine is shared: with other work on its two cores, one plan's step time varies
by 30-130 % between rounds of one run. An attempt can therefore fail on noise alone;
the whole measurement (calibration included) is repeated up to three times, and every
attempt's table is printed.
"""

from __future__ import annotations

import pytest

from flexmoe import Plan
from flexmoe.planner import Cluster, Load, load_cluster, plan, simulate
from flexmoe.tools.measure import BenchCase, MeasuredPlan, measure_plans

pytestmark = pytest.mark.distributed

TOLERANCE = 0.30
TIE = 0.15
ATTEMPTS = 3
ROUNDS = 4


def _compare(cluster: Cluster, case: BenchCase, measured: list[MeasuredPlan]) -> list[str]:
    """Print predicted vs measured per plan; return what breaks the two criteria."""
    workload = case.workload()
    rows = []
    for m in measured:
        candidate = Plan(r=m.plan.r or 0, d=m.plan.d, exchange=m.plan.exchange, reroute=False)
        load = Load.from_counts(m.routed_per_expert)
        p = simulate(cluster, workload, load, case.world, candidate, ranks_per_node=case.ranks_per_node)
        rows.append((m, p))
    problems = []
    print(f"\n{case.world} workers, {case.experts} experts:")
    for m, p in rows:
        error = p.time / m.median - 1
        print(
            f"  {p.plan.label:16s} measured {m.median * 1e3:7.1f} ms (min {min(m.times) * 1e3:6.1f}, "
            f"max {max(m.times) * 1e3:6.1f})  predicted {p.time * 1e3:7.1f} ms  {error:+6.0%}"
        )
        if abs(error) > TOLERANCE:
            problems.append(f"{p.plan.label}: predicted {error:+.0%} off")
    best_measured = min(rows, key=lambda r: r[0].median)[0]
    chosen = min(rows, key=lambda r: r[1].time)[0]
    print(f"  best measured {best_measured.plan}, predicted best {chosen.plan}")
    if chosen.median > (1 + TIE) * best_measured.median:
        problems.append(
            f"predicted best {chosen.plan} measures {chosen.median / best_measured.median:.2f}x "
            f"the best ({best_measured.plan})"
        )
    return problems


@pytest.mark.timing
@pytest.mark.parametrize("world", [2, 4])
def test_predicted_step_times_match_measured_gloo_runs(world):
    case = BenchCase(world=world)
    problems: list[str] = []
    for attempt in range(ATTEMPTS):
        measured, cluster = measure_plans([case], rounds=ROUNDS, calibrate=True)
        assert cluster is not None
        problems = _compare(cluster, case, measured[0])
        if not problems:
            return
        print(f"  attempt {attempt + 1}: {problems}")
    pytest.fail(f"{world} workers: " + "; ".join(problems))


@pytest.mark.timing
@pytest.mark.slow
def test_sharded_experts_match_measured_gloo_runs():
    case = BenchCase(world=4, experts=2)  # 2 experts in 2 hidden shards: r in {0, 1, 2}
    problems: list[str] = []
    for _ in range(ATTEMPTS):
        measured, cluster = measure_plans([case], rounds=ROUNDS, calibrate=True)
        assert cluster is not None
        problems = _compare(cluster, case, measured[0])
        if not problems:
            return
    pytest.fail("; ".join(problems))


def test_calibrate_command_writes_a_usable_cluster(tmp_path, capsys):
    from flexmoe.cli import main

    path = tmp_path / "this-machine.json"
    main(["calibrate", "--rounds", "1", "--output", str(path)])
    out = capsys.readouterr().out
    assert "GEMM fp32" in out and "all-to-all" in out and str(path) in out
    cluster = load_cluster(str(path))
    assert cluster.compute_slots_per_node and cluster.device.flops["fp32"] > 1e8
    assert cluster.sources["intra_node"].startswith("measured by `flexmoe calibrate`")
    report = plan(cluster, BenchCase(world=4).workload(), Load.uniform(8), 4, ranks_per_node=2)
    assert report.best.time > 0
    args = ["--devices", "4", "--dim", "256", "--hidden", "512", "--experts", "8"]
    main(["plan", "--cluster", str(path), *args])
    assert "best plan" in capsys.readouterr().out
