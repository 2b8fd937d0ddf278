"""Adaptive computation per token on the main job: eval loss against expert FLOPs per token.

Trains ``flexmoe train`` (the main job's data and model size: byte-level LM on the
standard library's source, 2 layers, dim 128, 8 SwiGLU experts of hidden 256) under
several routing configurations and seeds, then measures each final checkpoint on
held-out text: its eval loss and the **measured** mean routed experts per token of each
layer (zero-computation experts and top-p count what they really routed). Expert FLOPs
per token are ``sum over layers of mean_k(layer) * 6 * dim * expert_hidden`` (a SwiGLU
expert's three matrices, forward multiply-adds counted as 2 FLOPs); the router and the
attention are the same in every configuration and not counted.

Writes ``OUT/results.json`` (every run), ``docs/images/NAME.json`` (the aggregate;
``--name``, default ``adaptive-study``), ``docs/images/NAME.png`` (the plot) and prints a
markdown table.
Runs already trained (a ``summary.json`` in their directory) are not trained again, so
the study can be extended or resumed.

    python benchmarks/adaptive_study.py --steps 200 --seeds 0 1 2 --jobs 2
    python benchmarks/adaptive_study.py --configs top1 top2 --seeds 0 --steps 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flexmoe.checkpoint import load_checkpoint
from flexmoe.cli.train import build, load_corpus
from flexmoe.cli.train_adaptive import RoutingControl
from flexmoe.cli.train_config import TrainConfig
from flexmoe.layer import MoELayer, MoEStats

ROOT = Path(__file__).resolve().parent.parent

# name -> flexmoe train flags (on top of the common ones)
CONFIGS: dict[str, list[str]] = {
    "top1": ["--top-k", "1"],
    "top2": ["--top-k", "2"],
    "top4": ["--top-k", "4"],
    "top-p 0.5": ["--top-k", "4", "--top-p", "0.5"],
    "top-p 0.7": ["--top-k", "4", "--top-p", "0.7"],
    "top-p 0.9": ["--top-k", "4", "--top-p", "0.9"],
    "zero experts (top2 + skip,copy,const)": ["--top-k", "2", "--zero-experts", "skip,copy,constant"],
    "layers top-k 2,1": ["--top-k", "2", "--layer-top-k", "2,1"],
    "layers top-k 1,2": ["--top-k", "2", "--layer-top-k", "1,2"],
    "controller k=1.5 (top-p)": ["--top-k", "4", "--top-p", "0.7", "--target-experts", "1.5"],
    "top-k 2->1 at step 100": ["--top-k", "2", "--layer-top-k", "2->1@100"],
}
# name -> (the trained configuration, MoELayer.set_routing at evaluation): no training of their own
EVAL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "top2, evaluated at top-1": ("top2", {"top_k": 1}),
    "top2, evaluated at top-p 0.5": ("top2", {"top_p": 0.5}),
}
SLUG = {name: "".join(c if c.isalnum() else "-" for c in name).strip("-") for name in CONFIGS}


def train_run(name: str, seed: int, args: argparse.Namespace) -> Path:
    """Train one configuration and seed (skipped when its run directory has a summary)."""
    run_dir = _run_dir(name, seed, args)
    if (run_dir / "summary.json").exists():
        return run_dir
    command = [sys.executable, "-m", "flexmoe", "train", *CONFIGS[name], "--seed", str(seed)]
    command += ["--steps", str(args.steps), "--run-dir", str(run_dir), "--no-progress"]
    command += ["--eval-every", str(args.steps), "--log-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(args.src)}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.txt", "w", encoding="utf-8") as out:
        subprocess.run(
            ["nice", "-n", "10", *command], env=env, stdout=out, stderr=subprocess.STDOUT, check=True
        )
    print(f"trained {name} seed {seed}", flush=True)
    return run_dir


def _run_dir(name: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{SLUG[name]}-s{seed}"


@torch.no_grad()
def measure(run_dir: Path, batches: int, routing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The final checkpoint's eval loss and per-layer measured experts per token on held-out batches."""
    settings = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    settings.pop("world_size")
    config = TrainConfig(**{k: Path(v) if k in _PATHS and v is not None else v for k, v in settings.items()})
    trainer = build(config, 0, 1)
    control = RoutingControl.from_config(config, trainer.model.moe_layers())
    control.before_step(config.steps)  # the routing the run ended with (the checkpoint records top_k)
    manifest = load_checkpoint(run_dir / "checkpoints", trainer.model)
    control.load_state(manifest.get("extra", {}).get("adaptive"))
    for layer in trainer.model.moe_layers():
        layer.set_routing(**(routing or {}))
    model = trainer.model.eval()
    corpus = load_corpus(config)
    layers = model.moe_layers()
    hists: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for _ in layers]
    zero = [0 for _ in layers]
    choices = [0 for _ in layers]
    losses = []
    for b in range(batches):
        generator = torch.Generator().manual_seed(1234 + b)
        x, y = corpus.batch("val", config.batch_size, config.context, generator)
        logits = model(x)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        for i, layer in enumerate(layers):
            stats = _stats(layer)
            hist = stats.experts_per_token
            assert hist is not None
            hists[i] = _add(hists[i], hist)
            zero[i] += 0 if stats.zero_expert_choices is None else int(stats.zero_expert_choices.sum())
            choices[i] += stats.num_tokens * stats.top_k
    mean_k = [float((h * torch.arange(len(h))).sum()) / float(h.sum()) for h in hists]
    flops = sum(mean_k) * 6 * config.dim * config.expert_hidden
    return {
        "eval_loss": statistics.fmean(losses),
        "mean_k_per_layer": mean_k,
        "hist_per_layer": [h.tolist() for h in hists],
        "skip_rate_per_layer": [z / c for z, c in zip(zero, choices, strict=True)],
        "expert_flops_per_token": flops,
        "train_mean_k_per_layer": _train_mean_k(run_dir),
    }


_PATHS = ("run_dir", "resume", "trace", "tensorboard")


def _stats(layer: MoELayer) -> MoEStats:
    stats = layer.stats
    assert stats is not None
    return stats


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(len(a), len(b))
    out = torch.zeros(n, dtype=torch.int64)
    out[: len(a)] += a
    out[: len(b)] += b
    return out


def _train_mean_k(run_dir: Path) -> list[float] | None:
    """Mean experts per token per layer over every training step (``metrics.jsonl``'s per-step columns)."""
    per_layer: list[list[float]] = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        columns = record.get("per_step", {}).get("layers", [])
        for i, layer in enumerate(columns):
            if "experts_per_token" not in layer:
                return None
            while len(per_layer) <= i:
                per_layer.append([])
            per_layer[i] += layer["experts_per_token"]
    return [statistics.fmean(v) for v in per_layer] if per_layer else None


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: mean, min and max over seeds of the eval loss and the expert FLOPs per token.

    Also the eval loss minus top-2's of the same seed (the same initial weights of the
    shared parts and the same data order): a paired difference, with less of the
    seed-to-seed spread than the losses themselves.
    """
    top2 = {r["seed"]: r["eval_loss"] for r in results if r["config"] == "top2"}
    rows = []
    for name in [*CONFIGS, *EVAL_VARIANTS]:
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        loss = [r["eval_loss"] for r in runs]
        flops = [r["expert_flops_per_token"] for r in runs]
        paired = [r["eval_loss"] - top2[r["seed"]] for r in runs if r["seed"] in top2]
        rows.append(
            {
                "config": name,
                "delta_vs_top2": statistics.fmean(paired) if paired else None,
                "delta_vs_top2_std": statistics.stdev(paired) if len(paired) > 1 else 0.0,
                "delta_vs_top2_per_seed": paired,
                "flags": " ".join(CONFIGS[name]) if name in CONFIGS else str(EVAL_VARIANTS[name]),
                "seeds": [r["seed"] for r in runs],
                "eval_loss": statistics.fmean(loss),
                "eval_loss_min": min(loss),
                "eval_loss_max": max(loss),
                "eval_loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                "expert_flops_per_token": statistics.fmean(flops),
                "expert_flops_min": min(flops),
                "expert_flops_max": max(flops),
                "mean_k_per_layer": [
                    statistics.fmean(r["mean_k_per_layer"][i] for r in runs)
                    for i in range(len(runs[0]["mean_k_per_layer"]))
                ],
                "skip_rate": statistics.fmean(statistics.fmean(r["skip_rate_per_layer"]) for r in runs),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: loss mean ± std (min..max), FLOPs relative to top-2."""
    base = next((r for r in rows if r["config"] == "top2"), None)
    lines = [
        "| configuration | seeds | eval loss (mean ± std, min..max) | "
        "loss − top-2's, same seed (mean ± std) | experts/token per layer | skip rate | "
        "expert MFLOPs/token | FLOPs vs top-2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ks = ", ".join(f"{k:.2f}" for k in r["mean_k_per_layer"])
        ratio = f"{r['expert_flops_per_token'] / base['expert_flops_per_token'] - 1:+.0%}" if base else "-"
        lines.append(
            f"| {r['config']} | {len(r['seeds'])} | {r['eval_loss']:.4f} ± {r['eval_loss_std']:.4f} "
            f"({r['eval_loss_min']:.4f}..{r['eval_loss_max']:.4f}) | {_delta(r)} | {ks} | "
            f"{r['skip_rate']:.0%} | "
            f"{r['expert_flops_per_token'] / 1e6:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def _delta(row: dict[str, Any]) -> str:
    if row["delta_vs_top2"] is None:
        return "-"
    return f"{row['delta_vs_top2']:+.4f} ± {row['delta_vs_top2_std']:.4f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: eval loss (mean, min..max over seeds); right: minus top-2's of the same seed (mean ± std).

    Both against expert FLOPs per token; the dotted lines mark top-2's loss and 75 % of its FLOPs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    base = next((r for r in rows if r["config"] == "top2"), None)
    for n, r in enumerate(rows):
        x = r["expert_flops_per_token"] / 1e6
        style = {
            "color": colors[(2 * n) % 20 if n < 10 else (2 * n + 1) % 20],
            "marker": markers[n % len(markers)],
        }
        y = r["eval_loss"]
        yerr = [[y - r["eval_loss_min"]], [r["eval_loss_max"] - y]]
        left.errorbar(x, y, yerr=yerr, fmt="", capsize=3, ls="none", label=r["config"], **style)
        if r["delta_vs_top2"] is not None:
            right.errorbar(x, r["delta_vs_top2"], yerr=r["delta_vs_top2_std"], capsize=3, ls="none", **style)
    if base is not None:
        for ax, level in ((left, base["eval_loss"]), (right, 0.0)):
            ax.axhline(level, color="grey", ls=":", lw=1)
            ax.axvline(0.75 * base["expert_flops_per_token"] / 1e6, color="grey", ls=":", lw=1)
    left.set_ylabel("eval loss (nats/byte): mean, min..max over seeds")
    right.set_ylabel("eval loss − top-2's with the same seed: mean ± std")
    for ax in (left, right):
        ax.set_xlabel("expert MFLOPs per token (measured routed experts per token, both layers)")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=8)
    fig.suptitle("Adaptive computation on the main job (flexmoe train, 2 layers x 8 experts)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches measured per run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "adaptive-study")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the flexmoe sources the runs use")
    parser.add_argument("--images", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--name", default="adaptive-study", help="file name of the JSON and the plot")
    parser.add_argument("--train-only", action="store_true", help="train, do not measure")
    parser.add_argument("--measure-only", action="store_true", help="measure the runs already trained")
    args = parser.parse_args()
    jobs = [(name, seed) for seed in args.seeds for name in args.configs]
    if args.measure_only:
        jobs = [job for job in jobs if (_run_dir(*job, args) / "summary.json").exists()]
        run_dirs = [_run_dir(*job, args) for job in jobs]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            run_dirs = list(pool.map(lambda job: train_run(*job, args), jobs))
    if args.train_only:
        return
    torch.set_num_threads(args.threads)
    results = []
    for (name, seed), run_dir in zip(jobs, run_dirs, strict=True):
        measured = measure(run_dir, args.eval_batches)
        results.append({"config": name, "seed": seed, "run_dir": str(run_dir), **measured})
        for variant, (trained, routing) in EVAL_VARIANTS.items():
            if trained == name:
                measured = measure(run_dir, args.eval_batches, routing)
                results.append({"config": variant, "seed": seed, "run_dir": str(run_dir), **measured})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    rows = aggregate(results)
    args.images.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "seeds": args.seeds, "eval_batches": args.eval_batches, "command": sys.argv}
    (args.images / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1)
    )
    plot(rows, args.images / f"{args.name}.png")
    print(table(rows))


if __name__ == "__main__":
    main()
