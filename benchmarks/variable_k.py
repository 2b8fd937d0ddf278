"""Does a per-token number of experts cost only the FLOPs it uses?

For a case of ``benchmarks/layer.py``, one run times, interleaved round-robin on the same
weights and input: the layer with its fixed ``top_k``, with fewer fixed experts per
token, and with top-p routing at several ``p`` (capped at ``top_k``). Each row reports
the routed assignments (token-expert pairs computed), the time per step and the time
per routed assignment, and the median over rounds of that per-assignment time divided
by fixed top-k's in the same round. Fixed overheads (routing, the router GEMM, the
launch of each stage) make the time per assignment of any setting with fewer
assignments higher, fixed k included; so each top-p row is also compared with fixed k
interpolated to the same number of assignments (linearly between the nearest fixed-k
rows, per round): 1.00 means variable k costs exactly what fixed k costs for the same
work (the target is within 10 %).

The router's weights are scaled by ``--router-scale`` so that its probabilities are as
peaked as a trained router's; with the random initialisation every expert is nearly
equally likely and top-p would always take ``top_k`` experts.

    python benchmarks/variable_k.py                       # cases A and B, fp32
    python benchmarks/variable_k.py --cases C --precision bf16 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flexmoe
from harness import environment, measure_interleaved, write_json
from layer import CASES, Case, build_flexmoe, step_fn

TOP_P = (0.3, 0.5, 0.7, 0.9)


def variants(case: Case) -> dict[str, dict[str, Any]]:
    """The routing settings compared: fixed top-k, fewer fixed experts, top-p at several p."""
    found: dict[str, dict[str, Any]] = {f"top-{case.top_k}": {}}
    for k in sorted({1, case.top_k // 2} - {0, case.top_k}, reverse=True):
        found[f"top-{k}"] = {"top_k": k}
    for p in TOP_P:
        found[f"top-p {p}"] = {"top_p": p}
    return found


def routed_assignments(layer: flexmoe.MoELayer) -> int:
    """Token-expert pairs the last call computed (kept routed slots)."""
    stats = layer.stats
    assert stats is not None
    return int(stats.tokens_per_expert.sum())


def median(values: list[float]) -> float:
    return statistics.median(values)


def interpolate_fixed(fixed: list[tuple[int, list[float]]], work: int) -> list[float]:
    """Per round, fixed k's time at ``work`` assignments, linear between the nearest fixed rows."""
    below = max((f for f in fixed if f[0] <= work), default=fixed[0], key=lambda f: f[0])
    above = min((f for f in fixed if f[0] >= work), default=fixed[-1], key=lambda f: f[0])
    if above[0] == below[0]:
        return list(below[1])
    share = (work - below[0]) / (above[0] - below[0])
    return [b + share * (a - b) for b, a in zip(below[1], above[1], strict=True)]


def run_case(case: Case, repeats: int, precision: str, router_scale: float) -> dict[str, Any]:
    torch.manual_seed(0)
    autocast = precision == "autocast"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layer = build_flexmoe(case, "auto")
    with torch.no_grad():
        layer.router.weight.mul_(router_scale)
    layer.to(dtype)
    x = torch.randn(1, case.tokens, case.dim).to(dtype).requires_grad_(case.train)
    grad = torch.randn(1, case.tokens, case.dim)
    settings = variants(case)
    layers: dict[str, flexmoe.MoELayer] = {}
    for name, setting in settings.items():
        twin = build_flexmoe(case, "auto").to(dtype)
        twin.load_state_dict(layer.state_dict(), assign=True)  # shares the weights
        twin.set_routing(**setting)
        layers[name] = twin
    assignments: dict[str, int] = {}
    mean_k: dict[str, float] = {}
    for name, twin in layers.items():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            twin(x)
        assignments[name] = routed_assignments(twin)
        stats = twin.stats
        assert stats is not None
        mean_k[name] = stats.mean_experts_per_token
    candidates = {name: step_fn(twin, x, grad, case.train, autocast) for name, twin in layers.items()}
    timings = measure_interleaved(candidates, warmup=1, repeats=repeats)
    base = f"top-{case.top_k}"
    base_samples = [t / assignments[base] for t in timings[base].samples]
    fixed = sorted((assignments[n], timings[n].samples) for n in settings if not n.startswith("top-p"))
    rows = {}
    for name, timing in timings.items():
        per = [t / assignments[name] for t in timing.samples]
        rows[name] = {
            "mean_experts_per_token": mean_k[name],
            "assignments": assignments[name],
            "seconds": timing.median,
            "us_per_assignment": 1e6 * timing.median / assignments[name],
            "per_assignment_vs_fixed": median([p / b for p, b in zip(per, base_samples, strict=True)]),
        }
        if name.startswith("top-p"):
            expected = interpolate_fixed(fixed, assignments[name])
            ratios = [t / e for t, e in zip(timing.samples, expected, strict=True)]
            rows[name]["vs_fixed_at_same_work"] = median(ratios)
    return {"case": case.__dict__, "precision": precision, "router_scale": router_scale, "results": rows}


def print_case(case: Case, result: dict[str, Any]) -> None:
    print(f"\n{case.describe()}, {result['precision']}")
    print(
        f"  {'routing':<12}{'mean k':>8}{'assignments':>13}{'ms/step':>10}{'us/assign':>11}"
        f"{'vs top-k':>10}{'vs fixed, same work':>21}"
    )
    for name, row in result["results"].items():
        same = row.get("vs_fixed_at_same_work")
        print(
            f"  {name:<12}{row['mean_experts_per_token']:>8.2f}{row['assignments']:>13d}"
            f"{row['seconds'] * 1e3:>10.1f}{row['us_per_assignment']:>11.3f}"
            f"{row['per_assignment_vs_fixed']:>9.2f}x" + ("" if same is None else f"{same:>20.2f}x")
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["A", "B"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16", "autocast"), default="fp32")
    parser.add_argument("--router-scale", type=float, default=2.0, help="router weight multiplier")
    parser.add_argument("--json", default=None, help="write all results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    env = environment()
    print("environment:", ", ".join(f"{k}={v}" for k, v in env.items()))
    results = {}
    for name in args.cases:
        results[name] = run_case(CASES[name], args.repeats, args.precision, args.router_scale)
        print_case(CASES[name], results[name])
    write_json(args.json, {"environment": env, "cases": results})


if __name__ == "__main__":
    main()
