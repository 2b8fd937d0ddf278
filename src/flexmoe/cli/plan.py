r"""``flexmoe plan``: predict an MoE layer's plans on a cluster, or sweep device counts.

    flexmoe plan --cluster a100-80gb-hdr200 --devices 256 --load zipf:1.2
    flexmoe plan --sweep-devices 16,32,64,128,256,512,1024,2048 --experts-per-device 1 \\
        --load zipf:1.2 --plot docs/planner-zipf

Prints the best plan, a table of candidates (time, exchange, experts, overlap,
weight gathers, rerouting, messages, memory, drops) and the speedup over the static
baselines; with ``--sweep-devices``, one row per device count and (``--plot``) a PNG
and an SVG of step time and speedup per strategy; with ``--load trace:PATH[:LAYER]
--per-step``, each plan's median, p90 and max over the recorded steps of a routing
trace and the per-step best plan (``flexmoe.planner.replay.simulate_trace``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexmoe.cli.options import CliError, float_in, int_in, one_line
from flexmoe.config import RerouteConfig
from flexmoe.planner import (
    Cluster,
    Load,
    MoEWorkload,
    PlanReport,
    load_cluster,
    plan,
    preset_names,
    read_routing_trace,
    sweep,
)
from flexmoe.planner.replay import format_trace_simulation, simulate_trace
from flexmoe.planner.report import format_plan, format_sweep, plot_sweep, sweep_rows

__all__ = ["add_plan_arguments", "parse_load", "plot_paths", "run_plan"]

DEFAULT_DEVICES = 64


# The search's time grows about quadratically with the device count (8192 devices take
# seconds, 16384 about a minute): beyond these bounds an answer would take minutes.
MAX_DEVICES = 8192
MAX_EXPERTS = 65536
MAX_SWEEP_POINTS = 32
MAX_DEGREE = 64


def _int_list(minimum: int, maximum: int, most: int) -> Callable[[str], list[int]]:
    """An argparse ``type=``: comma-separated integers in ``[minimum, maximum]``, at most ``most``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < minimum or max(values) > maximum:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers in [{minimum}, {maximum}], got {text!r}"
            )
        if len(values) > most:
            raise argparse.ArgumentTypeError(f"expected at most {most} values, got {len(values)}")
        return values

    parse.__name__ = "integer list"
    return parse


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the plan command's options (each with a help line; ``--help`` shows the defaults)."""
    where = parser.add_argument_group("cluster")
    where.add_argument(
        "--cluster",
        default="a100-80gb-hdr200",
        help=f"a preset ({', '.join(preset_names())}), 'this-machine' (after `flexmoe calibrate`) "
        "or a JSON file",
    )
    where.add_argument(
        "--devices",
        type=int_in(1, MAX_DEVICES),
        default=None,
        help=f"devices (ranks) for a single prediction, in [1, {MAX_DEVICES}] (none: {DEFAULT_DEVICES})",
    )
    where.add_argument(
        "--sweep-devices",
        type=_int_list(1, MAX_DEVICES, MAX_SWEEP_POINTS),
        default=None,
        help=f"device counts to sweep, e.g. 16,32,64,...,2048 (each in [1, {MAX_DEVICES}])",
    )
    where.add_argument(
        "--ranks-per-node",
        type=int_in(1),
        default=None,
        help="2DH grouping when every rank is on one machine",
    )
    where.add_argument(
        "--memory-budget-gb",
        type=float_in(positive=True),
        default=None,
        help="memory one layer may use per device",
    )
    layer = parser.add_argument_group("layer")
    layer.add_argument("--dim", type=int_in(1), default=2048, help="model dim")
    layer.add_argument("--hidden", type=int_in(1), default=2048, help="hidden dim per expert")
    layer.add_argument(
        "--experts",
        type=int_in(1, MAX_EXPERTS),
        default=None,
        help="experts (none: --experts-per-device, or one per device)",
    )
    layer.add_argument(
        "--experts-per-device",
        type=float_in(positive=True),
        default=None,
        help="scale the experts with the devices (sweeps)",
    )
    layer.add_argument("--top-k", type=int_in(1), default=2, help="experts per token, <= the experts")
    layer.add_argument(
        "--gated", action=argparse.BooleanOptionalAction, default=False, help="SwiGLU-style experts"
    )
    layer.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="number format")
    layer.add_argument("--tokens", type=int_in(1), default=16384, help="tokens per device")
    layer.add_argument(
        "--capacity-factor",
        type=float_in(),
        default=0.0,
        help="flexmoe's policy: >0 fixed, <0 adaptive cap, 0 dropless",
    )
    layer.add_argument("--inference", action="store_true", help="forward only")
    search = parser.add_argument_group("routing and search")
    search.add_argument(
        "--load",
        default="uniform",
        help="uniform | zipf:S | hot:SHARE:COUNT | trace:PATH[:LAYER] (a routing trace, its mean load)",
    )
    search.add_argument(
        "--per-step",
        action="store_true",
        help="with --load trace:PATH[:LAYER]: predict every recorded step (median, p90, per-step best)",
    )
    search.add_argument(
        "--shuffle-seed",
        type=int_in(-1),
        default=0,
        help="spread Zipf's hot experts over ranks (-1: hottest on rank 0)",
    )
    search.add_argument(
        "--degrees",
        type=_int_list(1, MAX_DEGREE, MAX_DEGREE),
        default=[1, 2, 4, 8],
        help=f"pipelining degrees d, each in [1, {MAX_DEGREE}]",
    )
    search.add_argument("--no-rerouting", action="store_true", help="leave rerouting out of the candidates")
    search.add_argument(
        "--reroute-min-chunk",
        type=int_in(1),
        default=None,
        help="rerouting: smallest piece moved (none: the layer default 1)",
    )
    search.add_argument(
        "--reroute-max-copies",
        type=int_in(0),
        default=None,
        help="rerouting: expert copies a rank may receive (none: no bound)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int_in(1), default=12, help="candidates to list")
    out.add_argument(
        "--plot",
        default=None,
        help="with --sweep-devices: write PLOT.png and PLOT.svg (a .png or .svg suffix is dropped)",
    )
    out.add_argument("--json", default=None, help="also write the predictions as JSON")


def _check_combinations(args: argparse.Namespace) -> None:
    """Refuse options that contradict each other or would be silently ignored."""
    if args.sweep_devices is not None and args.devices is not None:
        raise CliError("argument --devices: not allowed with --sweep-devices (the sweep names the devices)")
    if args.experts is not None and args.experts_per_device is not None:
        raise CliError("argument --experts-per-device: not allowed with --experts (give one of them)")
    if args.plot is not None and args.sweep_devices is None:
        raise CliError("argument --plot: needs --sweep-devices (a plot is of a sweep)")
    if args.per_step and args.sweep_devices is not None:
        raise CliError("argument --per-step: predicts one device count; leave out --sweep-devices")
    if args.plot is not None and Path(args.plot).name in ("", ".", ".."):
        raise CliError(f"argument --plot: expected a file name, got {args.plot!r}")
    for flag, value in (("--plot", args.plot), ("--json", args.json)):
        if value is not None and not Path(value).expanduser().resolve().parent.is_dir():
            raise CliError(f"argument {flag}: the folder of {value!r} does not exist")
    largest = max(args.sweep_devices or [args.devices or DEFAULT_DEVICES])
    if args.experts_per_device is not None and round(args.experts_per_device * largest) > MAX_EXPERTS:
        raise CliError(
            f"argument --experts-per-device: {args.experts_per_device:g} per device on {largest} devices "
            f"is more than {MAX_EXPERTS} experts"
        )
    if args.experts is None and args.experts_per_device is None and largest > MAX_EXPERTS:
        raise CliError(f"argument --devices: one expert per device is more than {MAX_EXPERTS} experts")


def parse_load(spec: str, num_experts: int, shuffle_seed: int | None) -> Load:
    """A ``Load`` from the command line's ``--load`` text."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "uniform" and not rest:
            return Load.uniform(num_experts)
        if kind == "zipf":
            return Load.zipf(num_experts, float(rest), shuffle_seed)
        if kind == "hot":
            share, count = rest.split(":")
            return Load.hot_experts(num_experts, float(share), int(count), shuffle_seed)
        if kind == "trace":
            path, _, layer = rest.partition(":")
            trace = read_routing_trace(path)
            if trace.num_experts != num_experts:
                raise ValueError(f"the trace has {trace.num_experts} experts, the layer {num_experts}")
            return Load.from_counts(trace.mean_counts(layer or None), name=f"trace {path}")
    except (ValueError, TypeError, OSError) as error:
        raise CliError(f"bad --load {spec!r}: {one_line(error)}") from None
    raise CliError(f"bad --load {spec!r}: expected uniform, zipf:S, hot:SHARE:COUNT or trace:PATH")


def _workload(args: argparse.Namespace, experts: int) -> MoEWorkload:
    if args.top_k > experts:
        raise CliError(f"argument --top-k: must be <= the experts ({experts}), got {args.top_k}")
    try:
        return MoEWorkload(
            dim=args.dim,
            hidden_dim=args.hidden,
            num_experts=experts,
            top_k=args.top_k,
            gated=args.gated,
            dtype=args.dtype,
            tokens_per_device=args.tokens,
            capacity_factor=args.capacity_factor,
            training=not args.inference,
        )
    except ValueError as error:
        raise CliError(one_line(error)) from None


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Run the command; returns what it printed as data (also written with ``--json``)."""
    _check_combinations(args)
    try:
        cluster = load_cluster(args.cluster)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:  # a missing or bad file
        raise CliError(f"argument --cluster: cannot use {args.cluster!r}: {one_line(error)}") from None
    try:
        reroute = RerouteConfig(
            min_chunk=args.reroute_min_chunk or 1, max_copies_per_rank=args.reroute_max_copies
        )
    except ValueError as error:
        raise CliError(one_line(error)) from None
    budget = None if args.memory_budget_gb is None else args.memory_budget_gb * 1e9
    print(f"cluster {cluster.name}: {cluster.device.name}, {cluster.devices_per_node} per node")
    if args.sweep_devices:
        result = _run_sweep(args, cluster, budget, reroute)
    elif args.per_step:
        result = _run_per_step(args, cluster, budget, reroute)
    else:
        result = _run_single(args, cluster, budget, reroute)
    return _write_json(args, result)


def _seed(args: argparse.Namespace) -> int | None:
    return None if args.shuffle_seed < 0 else int(args.shuffle_seed)


def _run_sweep(
    args: argparse.Namespace, cluster: Cluster, budget: float | None, reroute: RerouteConfig
) -> dict[str, Any]:
    """``--sweep-devices``: the best plan and the baselines at every device count (and ``--plot``)."""
    per_device = args.experts_per_device
    if per_device is None and args.experts is None:
        per_device = 1.0
    experts = args.experts or max(1, round((per_device or 1) * args.sweep_devices[0]))
    workload = _workload(args, experts)
    print(_describe(workload, args))
    started = time.perf_counter()
    try:
        reports = sweep(
            cluster,
            workload,
            (lambda E: parse_load(args.load, E, _seed(args)))
            if per_device
            else parse_load(args.load, experts, _seed(args)),
            args.sweep_devices,
            experts_per_device=per_device,
            memory_budget=budget,
            reroute_config=reroute,
        )
    except ValueError as error:
        raise CliError(one_line(error)) from None
    print(format_sweep(reports))
    print(f"({time.perf_counter() - started:.2f} s for {len(reports)} device counts)")
    if args.plot:
        written = _plot(reports, args.plot, title=f"{_describe(workload, args)} on {cluster.name}")
        print("wrote " + ", ".join(str(p) for p in written))
    return {"sweep": sweep_rows(reports)}


def _run_single(
    args: argparse.Namespace, cluster: Cluster, budget: float | None, reroute: RerouteConfig
) -> dict[str, Any]:
    """One device count: every candidate plan, the best, and the speedups over the baselines."""
    devices = args.devices or DEFAULT_DEVICES
    experts = args.experts or max(1, round((args.experts_per_device or 1) * devices))
    workload = _workload(args, experts)
    print(_describe(workload, args))
    load = parse_load(args.load, experts, _seed(args))
    try:
        report = plan(
            cluster,
            workload,
            load,
            devices,
            ranks_per_node=args.ranks_per_node,
            memory_budget=budget,
            degrees=args.degrees,
            rerouting=not args.no_rerouting,
            reroute_config=reroute,
        )
    except ValueError as error:
        raise CliError(one_line(error)) from None
    print(format_plan(report, args.top))
    return {
        "best": report.best.plan.label,
        "best_s": report.best.time,
        "speedups": report.speedups(),
        "candidates": [
            {
                "plan": p.plan.label,
                "step_s": p.time,
                "peak_memory_bytes": p.peak_memory,
                "fits": p.fits,
            }
            for p in [*report.predictions, *report.baselines]
        ],
    }


def plot_paths(plot: str) -> tuple[Path, Path]:
    """The PNG and SVG that ``--plot PLOT`` writes: ``PLOT.png``, ``PLOT.svg``.

    Every dot of ``PLOT`` is kept (``out.v1`` -> ``out.v1.png``); only a ``.png`` or
    ``.svg`` suffix is taken for the format and dropped.
    """
    stem = Path(plot)
    if stem.suffix in (".png", ".svg"):
        stem = stem.with_name(stem.stem)
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")


def _plot(reports: list[PlanReport], plot: str, title: str) -> list[Path]:
    """Draw into a scratch folder beside the target, then move the files to ``plot_paths(plot)``.

    ``plot_sweep`` names its files with ``with_suffix``, which would drop a dotted
    part of the name (``out.v1``); a dot-free scratch name keeps the user's name whole.
    """
    targets = plot_paths(plot)
    with tempfile.TemporaryDirectory(dir=targets[0].parent, prefix=".flexmoe-plot-") as scratch:
        written = sorted(plot_sweep(reports, Path(scratch) / "plot", title=title))
        by_suffix = {path.suffix: path for path in written}
        for target in targets:
            os.replace(by_suffix[target.suffix], target)
    return list(targets)


def _write_json(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2, default=str)
        print(f"wrote {args.json}")
    return result


def _run_per_step(
    args: argparse.Namespace,
    cluster: Cluster,
    budget: float | None,
    reroute: RerouteConfig,
) -> dict[str, Any]:
    """``--per-step``: every recorded step of a trace's layer through the simulator.

    The layer has the trace's expert count unless ``--experts`` says otherwise.
    """
    kind, _, rest = args.load.partition(":")
    if kind != "trace" or not rest:
        raise CliError(f"--per-step needs --load trace:PATH[:LAYER], got {args.load!r}")
    path, _, layer = rest.partition(":")
    try:
        trace = read_routing_trace(path)
    except (ValueError, OSError) as error:
        raise CliError(f"bad --load {args.load!r}: {one_line(error)}") from None
    workload = _workload(args, args.experts or trace.num_experts)
    print(_describe(workload, args))
    devices = args.devices or DEFAULT_DEVICES
    try:
        simulation = simulate_trace(
            cluster,
            workload,
            trace,
            devices,
            layer=layer or None,
            ranks_per_node=args.ranks_per_node,
            memory_budget=budget,
            degrees=args.degrees,
            rerouting=not args.no_rerouting,
            reroute_config=reroute,
        )
    except (ValueError, OSError) as error:
        raise CliError(f"bad --load {args.load!r}: {one_line(error)}") from None
    print(f"{devices} devices, trace {path}")
    print(format_trace_simulation(simulation, args.top))
    return {
        "layer": simulation.layer,
        "steps": simulation.steps,
        "plans": simulation.summary(),
        "step_times_s": {c.label: simulation.times_SP[:, p].tolist() for p, c in enumerate(simulation.plans)},
    }


def _describe(workload: MoEWorkload, args: argparse.Namespace) -> str:
    kind = "gated" if workload.gated else "plain"
    experts = (
        f"{args.experts_per_device:g} expert(s) per device"
        if args.experts_per_device
        else f"{workload.num_experts} experts"
    )
    if args.sweep_devices and args.experts is None and args.experts_per_device is None:
        experts = "1 expert per device"
    return (
        f"layer: dim {workload.dim}, hidden {workload.hidden_dim} ({kind}), {experts}, top-{workload.top_k}, "
        f"{workload.dtype}, {workload.tokens_per_device} tokens per device, capacity factor "
        f"{workload.capacity_factor:g}, {'training' if workload.training else 'inference'}; load {args.load}"
    )
