"""``flexmoe report RUN_DIR``: an HTML page and PNG plots of a ``flexmoe train`` run.

Reads ``metrics.jsonl``, ``config.json`` and ``summary.json`` from the run directory
and writes, next to them, ``report.html`` and:

- ``loss.png``: training loss per logged step and evaluation loss;
- ``throughput.png``: tokens per second;
- ``load_layer<i>.png``: per-expert share of the routed assignments over time, per layer
  (a heatmap: an even router is a flat colour, a hot expert a bright row);
- ``dropped.png``: share of assignments dropped by the capacity limit, per layer;
- ``plans.png``: the parallel plan each layer ran with over time.

Needs matplotlib (``pip install 'flexmoe[report]'``).
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["add_report_arguments", "render_report", "run_report"]


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``flexmoe report``."""
    parser.add_argument("run_dir", type=Path, help="a directory written by `flexmoe train`")


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}:{number}: not a JSON line ({error})") from error
        (evals if "eval_loss" in record else train).append(record)
    return train, evals


def render_report(run_dir: Path) -> Path:
    """Write the plots and ``report.html`` into ``run_dir``; returns the HTML path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the report extra installs it
        raise SystemExit("flexmoe report needs matplotlib: pip install 'flexmoe[report]'") from error
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise SystemExit(f"{run_dir} has no metrics.jsonl: is it a `flexmoe train` run directory?")
    train, evals = _read_metrics(metrics_path)
    if not train:
        raise SystemExit(f"{metrics_path} holds no training steps yet")
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    )
    steps = [r["step"] for r in train]
    figures: list[tuple[str, str]] = []

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        figures.append((name, caption))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["loss"] for r in train], label="train (mean over workers)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png", "Loss")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r["tokens_per_s"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s (all workers)")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png", "Throughput")

    num_layers = len(train[0]["layers"])
    for i in range(num_layers):
        shares = []
        for r in train:
            routed = r["layers"][i]["routed"]
            total = sum(routed) or 1
            shares.append([c / total for c in routed])
        fig, ax = plt.subplots(figsize=(7, 3))
        image = ax.imshow(
            list(zip(*shares, strict=True)),
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(shares[0]) - 0.5),
        )
        fig.colorbar(image, ax=ax, label="share of assignments")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        save(fig, f"load_layer{i}.png", f"Expert load, layer {i} (even: {1 / len(shares[0]):.3f} each)")

    fig, ax = plt.subplots(figsize=(7, 3))
    for i in range(num_layers):
        rates = [r["layers"][i]["dropped"] / max(1, r["layers"][i]["assignments"]) for r in train]
        ax.plot(steps, rates, label=f"layer {i}")
    ax.set_xlabel("step")
    ax.set_ylabel("dropped share")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "dropped.png", "Dropped assignments (capacity limit)")

    plans = sorted({layer["plan"] for r in train for layer in r["layers"]})
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(plans)))
    for i in range(num_layers):
        ax.plot(steps, [plans.index(r["layers"][i]["plan"]) for r in train], ".", label=f"layer {i}")
    ax.set_yticks(range(len(plans)), plans)
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
    save(fig, "plans.png", "Parallel plan per layer")

    rows = {
        **{f"summary: {k}": v for k, v in summary.items()},
        **{f"setting: {k}": v for k, v in config.items()},
    }
    table = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items()
    )
    images = "\n".join(
        f'<figure><img src="{name}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for name, c in figures
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flexmoe run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:1em}}
img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>flexmoe run <code>{html.escape(str(run_dir))}</code></h1>
{images}
<h2>Run</h2><table>{table}</table>
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def run_report(args: argparse.Namespace) -> None:
    """Render and say where."""
    out = render_report(args.run_dir)
    print(f"wrote {out} and {len(list(args.run_dir.glob('*.png')))} plots")
