"""Single-device MoE layer benchmark: flexmoe vs transformers' Mixtral block vs the machine.

For each case, in one run: time per step (median of interleaved repeats), achieved
GFLOP/s, percentage of this machine's dense-GEMM throughput (measured in the same run),
for memory-bound cases the percentage of the bandwidth roofline (bytes of expert
weights touched / the read bandwidth of a streaming read of the experts' weights, timed
in the same rounds), and the ratio against transformers' ``MixtralSparseMoeBlock``
holding the same weights, in each of its experts implementations (``eager``,
``grouped_mm``), when transformers is installed. Cases without
gradients also time ``flexmoe[prepared]``: the same layer and weights after the opt-in
``experts.prepare_for_inference()`` (oneDNN-packed weight copies, see flexmoe.experts.packed).
``GEMMs only[seq|par]`` time the step's expert GEMMs alone on its real per-expert row
counts (no routing, permutation, activation or allocation), one after another on all
cores or whole GEMMs on separate cores: the floor of any implementation built on those
BLAS calls, hence a bound on the speed-up any of them can reach over another. Cases
without gradients also time ``GEMMs only[packed]``: the same products on the packed
weights ``flexmoe[prepared]`` uses, the floor of that path.

    python benchmarks/layer.py                 # all cases
    python benchmarks/layer.py --cases A C --repeats 9 --json out.json
    python benchmarks/layer.py --cases A B --compile   # adds the torch.compile rows
    python benchmarks/layer.py --precision bf16         # bf16 layers (or autocast: fp32 under autocast)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flexmoe
from flexmoe.experts.packed import PackedExpertWeights, PackedWeight, packed_linear
from flexmoe.experts.segments import for_each_segment, segments_of
from harness import environment, machine_limits, measure_interleaved, write_json


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    dim: int
    hidden: int
    experts: int
    top_k: int
    train: bool  # forward+backward if True, else forward under inference_mode
    activation: str = "swiglu"

    def describe(self) -> str:
        mode = "fwd+bwd" if self.train else "fwd, no grad"
        return (
            f"{self.name}: tokens {self.tokens}, dim {self.dim}, hidden {self.hidden}, "
            f"{self.experts} experts, "
            f"top-{self.top_k}, {self.activation}, {mode}"
        )


CASES = {
    "A": Case("A", 4096, 1024, 1024, 8, 2, True),
    "B": Case("B", 2048, 1024, 256, 64, 8, True),
    "C": Case("C", 64, 2048, 768, 128, 8, False),
}


def build_flexmoe(case: Case, backend: str) -> flexmoe.MoELayer:
    return flexmoe.MoELayer(
        case.dim,
        case.hidden,
        case.experts,
        case.top_k,
        activation=case.activation,
        backend=backend,
        load_balance_weight=0.0,  # the transformers block computes no aux loss either
    )


def build_hf(case: Case, layer: flexmoe.MoELayer, implementation: str) -> torch.nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=case.dim,
        intermediate_size=case.hidden,
        num_local_experts=case.experts,
        num_experts_per_tok=case.top_k,
        experts_implementation=implementation,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_in)
        block.experts.down_proj.copy_(layer.experts.w_out)
    return block


def step_fn(
    module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, train: bool, autocast: bool = False
) -> Callable[[], Any]:
    """One timed step; ``autocast``: fp32 parameters under ``torch.autocast(bf16)``."""
    params = list(module.parameters())
    if train:

        def step() -> None:
            for p in params:
                p.grad = None
            x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(x)
            y.backward(grad.to(y.dtype))

        return step

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            module(x)

    return infer


def expert_gemms_only(
    layer: flexmoe.MoELayer,
    counts: list[int],
    train: bool,
    parallel: bool,
    dtype: torch.dtype,
    with_casts: bool = False,
) -> Callable[[], None]:
    """The step's expert GEMMs and nothing else: a floor for any implementation built on them.

    One BLAS call per GEMM and expert (forward: ``x W_in^T``, ``a W_out^T``; backward also
    ``g W_out``, ``g^T a``, ``dh W_in``, ``dh^T x``) on the step's real per-expert row
    counts, into buffers allocated once: no routing, permutation, activation, combine
    or allocation. ``parallel`` runs whole GEMMs on separate cores (flexmoe's segment
    runner, when the segments balance), otherwise one after another on all cores.
    ``with_casts`` adds what autocast cannot avoid with fp32 parameters: each step casts
    the fp32 expert weights to ``dtype`` and their gradients back to fp32.
    """
    master_in, master_out = layer.experts.w_in.detach().float(), layer.experts.w_out.detach().float()
    w_in, w_out = master_in.to(dtype), master_out.to(dtype)
    num_rows, (width, dim), hidden = sum(counts), w_in.shape[1:], w_out.shape[2]
    x, g, y, dx = (torch.randn(num_rows, dim, dtype=dtype) for _ in range(4))
    h, dh = torch.randn(num_rows, width, dtype=dtype), torch.randn(num_rows, width, dtype=dtype)
    a, da = torch.randn(num_rows, hidden, dtype=dtype), torch.randn(num_rows, hidden, dtype=dtype)
    dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
    segments = segments_of(counts)

    def work(e: int, s: int, t: int) -> None:
        torch.mm(x[s:t], w_in[e].t(), out=h[s:t])
        torch.mm(a[s:t], w_out[e].t(), out=y[s:t])
        if train:
            torch.mm(g[s:t], w_out[e], out=da[s:t])
            torch.mm(g[s:t].t(), a[s:t], out=dw_out[e])
            torch.mm(dh[s:t], w_in[e], out=dx[s:t])
            torch.mm(dh[s:t].t(), x[s:t], out=dw_in[e])

    def step() -> None:
        with torch.no_grad():
            if with_casts:
                w_in.copy_(master_in)
                w_out.copy_(master_out)
            if parallel:
                for_each_segment(segments, work, x.device)
            else:
                for segment in segments:
                    work(*segment)
            if with_casts and train:
                master_in.copy_(dw_in)  # stands for the fp32 gradient the cast writes
                master_out.copy_(dw_out)

    return step


def packed_gemms_only(layer: flexmoe.MoELayer, counts: list[int], dtype: torch.dtype) -> Callable[[], None]:
    """The step's expert products on oneDNN-packed weights, and nothing else (inference).

    What ``flexmoe[prepared]`` runs for its experts (``x W_in^T`` and ``a W_out^T`` per
    expert on its real row count, one product after another on all cores, packed as
    ``prepare_for_inference`` packs): the floor of the prepared path, and the rate at
    which this CPU's fastest product kernel reads the weights at these row counts.
    """
    w_in = layer.experts.w_in.detach().to(dtype)
    w_out = layer.experts.w_out.detach().to(dtype)
    active = [e for e, n in enumerate(counts) if n]
    experts = PackedExpertWeights(w_in, w_out)  # packed as prepare_for_inference packs
    packed = {
        e: (
            PackedWeight(experts.w_in[e], (w_in.shape[1], w_in.shape[2]), dtype),
            PackedWeight(experts.w_out[e], (w_out.shape[1], w_out.shape[2]), dtype),
        )
        for e in active
    }
    x = {e: torch.randn(counts[e], w_in.shape[2], dtype=dtype) for e in active}
    a = {e: torch.randn(counts[e], w_out.shape[2], dtype=dtype) for e in active}

    def step() -> None:
        with torch.no_grad():
            for e in active:
                packed_linear(x[e], packed[e][0])
                packed_linear(a[e], packed[e][1])

    return step


def run_case(
    case: Case, repeats: int, limits: Any, with_loop: bool, compiled: bool, precision: str = "fp32"
) -> dict[str, Any]:
    """Every contestant on one case; ``precision``: ``fp32``, ``bf16`` (converted) or ``autocast``."""
    torch.manual_seed(0)
    autocast = precision == "autocast"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # of parameters and input
    compute = torch.float32 if precision == "fp32" else torch.bfloat16
    layer = build_flexmoe(case, "auto")
    x = torch.randn(1, case.tokens, case.dim).to(dtype).requires_grad_(case.train)
    grad = torch.randn(1, case.tokens, case.dim)

    def step(module: torch.nn.Module) -> Callable[[], Any]:
        return step_fn(module, x, grad, case.train, autocast)

    hf_blocks: dict[str, torch.nn.Module] = {}
    for impl in ("eager", "grouped_mm"):
        block = build_hf(case, layer, impl)  # copies the fp32 weights, then converted below
        if block is not None:
            hf_blocks[impl] = block.to(dtype)
    layer.to(dtype)
    candidates: dict[str, Callable[[], Any]] = {"flexmoe": step(layer)}
    checked: dict[str, torch.nn.Module] = {}
    if not case.train:
        # The same weights (shared, not copied) with the opt-in packed inference copy.
        prepared = build_flexmoe(case, "auto").to(dtype)
        prepared.load_state_dict(layer.state_dict(), assign=True)
        assert isinstance(prepared.experts, flexmoe.experts.GroupedExperts)
        if prepared.experts.prepare_for_inference():
            candidates["flexmoe[prepared]"] = step(prepared)
            checked["flexmoe[prepared]"] = prepared
    if with_loop:
        loop_layer = build_flexmoe(case, "loop").to(dtype)
        loop_layer.load_state_dict(layer.state_dict())
        candidates["flexmoe[loop]"] = step(loop_layer)
    for impl, block in hf_blocks.items():
        candidates[f"hf[{impl}]"] = step(block)
    if compiled:
        # torch.compile with its defaults (Inductor); the same modules, so the same weights.
        flexmoe_compiled = torch.compile(layer, fullgraph=True)
        candidates["flexmoe[compiled]"] = step(flexmoe_compiled)
        checked["flexmoe[compiled]"] = flexmoe_compiled
        if "grouped_mm" in hf_blocks:
            hf_compiled = torch.compile(hf_blocks["grouped_mm"])
            hf_blocks["grouped_mm+compile"] = hf_compiled
            candidates["hf[grouped_mm+compile]"] = step(hf_compiled)

    # Same math, same weights: check before timing.
    checked.update({f"hf[{impl}]": block for impl, block in hf_blocks.items()})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = layer(x).float()
        for name, module in checked.items():
            error = (module(x).float() - ours).abs()
            if precision == "fp32":
                diff, limit = error.max().item(), 1e-4 * max(ours.abs().max().item(), 1.0)
            else:  # bf16: transformers' router runs in bf16, flexmoe's in fp32, so near-tied
                # tokens may pick other experts; compare the mean error instead of the max
                diff, limit = error.mean().item(), 0.1 * ours.abs().mean().item()
            if diff > limit:
                raise RuntimeError(f"case {case.name}: flexmoe and {name} differ by {diff:.3g}")
    stats = layer.stats
    assert stats is not None
    kept = int(stats.tokens_per_expert.sum())
    width = 2 * case.hidden if case.activation in ("swiglu", "geglu") else case.hidden
    flops = 2 * kept * case.dim * (width + case.hidden) * (3 if case.train else 1)
    active = int((stats.tokens_per_expert > 0).sum())
    weight_bytes = active * case.dim * (width + case.hidden) * compute.itemsize

    counts = [int(n) for n in stats.tokens_per_expert.tolist()]
    candidates["GEMMs only[seq]"] = expert_gemms_only(layer, counts, case.train, False, compute)
    candidates["GEMMs only[par]"] = expert_gemms_only(layer, counts, case.train, True, compute)
    if autocast:
        candidates["GEMMs+casts[par]"] = expert_gemms_only(layer, counts, case.train, True, compute, True)
    if "flexmoe[prepared]" in candidates:
        candidates["GEMMs only[packed]"] = packed_gemms_only(layer, counts, compute)

    # The machine's dense-GEMM throughput, timed round-robin with the candidates so that
    # clock-speed drift affects it alike: square GEMMs in the compute dtype, of about the
    # step's FLOPs.
    size = limits.gemm_size
    a, b, out = (torch.randn(size, size, dtype=compute) for _ in range(3))
    gemm_reps = max(1, round(flops / (2 * size**3)))
    candidates["dense GEMM"] = lambda: [torch.mm(a, b, out=out) for _ in range(gemm_reps)]
    read_bandwidth = limits.read_bandwidth
    if not case.train:
        # The roofline's bandwidth, timed in the same rounds: a streaming read of every
        # expert's weights in the compute dtype (the bytes the step must read, and more),
        # summed as fp32 (a bf16 sum converts every element and reads slower than memory).
        stored = [w.detach().to(compute) for w in (layer.experts.w_in, layer.experts.w_out)]
        stored_bytes = sum(w.numel() * w.element_size() for w in stored)
        candidates["read weights"] = lambda: [w.view(torch.float32).sum() for w in stored]
    timings = measure_interleaved(candidates, warmup=1, repeats=repeats)
    gemm_flops = 2 * size**3 * gemm_reps / timings.pop("dense GEMM").median
    if not case.train:
        read_bandwidth = stored_bytes / timings.pop("read weights").median
    paired = {}
    if "flexmoe[compiled]" in timings:
        ours = timings["flexmoe[compiled]"]
        paired["compiled_vs_eager_flexmoe"] = ours.paired_speedup(timings["flexmoe"])
        if "hf[grouped_mm+compile]" in timings:
            paired["compiled_vs_compiled_grouped_mm"] = ours.paired_speedup(timings["hf[grouped_mm+compile]"])
    rows = {}
    for name, timing in timings.items():
        t = timing.median
        row = {
            "seconds": t,
            "min": timing.min,
            "max": timing.max,
            "gflops": flops / t / 1e9,
            "pct_dense_gemm": 100 * flops / t / gemm_flops,
        }
        if not case.train:
            row["pct_bandwidth_roofline"] = 100 * (weight_bytes / read_bandwidth) / t
        for impl in hf_blocks:
            row[f"speedup_vs_hf_{impl}"] = timings[f"hf[{impl}]"].median / t
        rows[name] = row
    return {
        "case": case.__dict__,
        "dense_gemm_gflops": gemm_flops / 1e9,
        "read_bandwidth_gbs": read_bandwidth / 1e9,
        "flops_per_step": flops,
        "expert_weight_bytes_touched": weight_bytes,
        "active_experts": active,
        "load_max_over_mean": stats.load_max_over_mean,
        "results": rows,
        "paired": paired,
    }


def print_case(case: Case, result: dict[str, Any]) -> None:
    print(f"\n{case.describe()}")
    print(
        f"  {result['flops_per_step'] / 1e9:.1f} GFLOP/step, {result['active_experts']} active experts, "
        f"load max/mean {result['load_max_over_mean']:.2f}, "
        f"expert weights touched {result['expert_weight_bytes_touched'] / 1e9:.2f} GB; "
        f"dense GEMM {result['dense_gemm_gflops']:.1f} GFLOP/s"
        + ("" if case.train else f", read bandwidth {result['read_bandwidth_gbs']:.1f} GB/s")
        + " (timed alongside)"
    )
    header = f"  {'impl':<18}{'ms/step':>10}{'GFLOP/s':>10}{'% GEMM':>9}"
    if not case.train:
        header += f"{'% BW roof':>11}"
    hf_keys = [k for k in next(iter(result["results"].values())) if k.startswith("speedup_vs_hf_")]
    for key in hf_keys:
        header += f"{'vs ' + key.removeprefix('speedup_vs_hf_'):>14}"
    print(header)
    for name, row in result["results"].items():
        line = (
            f"  {name:<18}{row['seconds'] * 1e3:>10.1f}{row['gflops']:>10.1f}{row['pct_dense_gemm']:>8.1f}%"
        )
        if not case.train:
            line += f"{row['pct_bandwidth_roofline']:>10.1f}%"
        for key in hf_keys:
            line += f"{row[key]:>13.2f}x"
        print(line)
    rows = result["results"]
    floor = min(rows["GEMMs only[seq]"]["seconds"], rows["GEMMs only[par]"]["seconds"])
    summary = f"  the expert GEMMs alone (faster schedule): {floor * 1e3:.1f} ms; flexmoe is at "
    summary += f"{100 * floor / rows['flexmoe']['seconds']:.0f} % of that floor"
    if "hf[grouped_mm]" in rows:
        bound = rows["hf[grouped_mm]"]["seconds"] / floor
        summary += f"; no implementation on these GEMMs can beat grouped_mm by more than {bound:.2f}x"
    print(summary)
    if "GEMMs only[packed]" in rows:
        packed = rows["GEMMs only[packed]"]
        print(
            f"  the expert products on packed weights alone: {packed['seconds'] * 1e3:.1f} ms, "
            f"{packed['pct_bandwidth_roofline']:.0f} % of the bandwidth roofline at best; flexmoe[prepared] "
            f"is at {100 * packed['seconds'] / rows['flexmoe[prepared]']['seconds']:.0f} % of that floor"
        )
    if "GEMMs+casts[par]" in rows:
        casts = rows["GEMMs+casts[par]"]
        print(
            f"  the GEMMs with autocast's weight and gradient casts: {casts['seconds'] * 1e3:.1f} ms, "
            f"{casts['pct_dense_gemm']:.0f} % of the dense GEMM rate at best; flexmoe is at "
            f"{100 * casts['seconds'] / rows['flexmoe']['seconds']:.0f} % of that floor"
        )
    paired = result["paired"]
    if paired:
        line = "  compiled flexmoe (median of per-round ratios): "
        line += f"{paired['compiled_vs_eager_flexmoe']:.2f}x eager flexmoe"
        if "compiled_vs_compiled_grouped_mm" in paired:
            line += f", {paired['compiled_vs_compiled_grouped_mm']:.2f}x compiled grouped_mm"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-loop", action="store_true", help="skip the per-expert autograd loop baseline")
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "autocast"),
        default="fp32",
        help="fp32; bf16 (every contestant converted with .to(bfloat16)); autocast (fp32 parameters "
        "under torch.autocast(bfloat16)). The dense-GEMM rate and the GEMM floor use the compute dtype.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd flexmoe (fullgraph) and transformers grouped_mm (Inductor)",
    )
    args = parser.parse_args(argv)

    env = environment()
    print("environment:", ", ".join(f"{k}={v}" for k, v in env.items()))
    compute = torch.float32 if args.precision == "fp32" else torch.bfloat16
    print("precision:", args.precision)
    limits = machine_limits(dtype=compute)
    print("machine:", limits.describe())
    results = {}
    for name in args.cases:
        case = CASES[name]
        results[name] = run_case(case, args.repeats, limits, not args.no_loop, args.compile, args.precision)
        print_case(case, results[name])
    limits_after = machine_limits(dtype=compute)
    print("\nmachine after:", limits_after.describe(), "(large drift means the numbers above are noisy)")
    write_json(
        args.json,
        {
            "environment": env,
            "limits": limits.__dict__,
            "limits_after": limits_after.__dict__,
            "cases": results,
        },
    )


if __name__ == "__main__":
    main()
