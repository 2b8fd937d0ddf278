"""The figures of ``flexmoe report``: one function per figure, each drawn only when it says something.

Each ``*_figures`` function takes pyplot and the checked ``RunRecords`` and returns
``(figure, file name, caption)`` triples; an empty list when the run has nothing to
show there (no drops in a dropless run, one plan throughout, no rerouting).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from flexmoe.cli.report_adaptive import adaptive_figures
from flexmoe.cli.report_read import RunRecords, StepSeries

__all__ = ["EMA_WEIGHT", "FIGURES", "Figures", "can_drop", "ema", "plan_segments"]

Figures = list[tuple[Any, str, str]]  # (matplotlib figure, file name, caption)
EMA_WEIGHT = 0.9  # of the smoothed training loss: about the last 10 steps


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased (TensorBoard's smoothing): the first value is itself."""
    out, average, norm = [], 0.0, 0.0
    for value in values:
        if math.isnan(value):
            out.append(math.nan)
            continue
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def _has_values(values: Sequence[float]) -> bool:
    return any(not math.isnan(v) for v in values)


def _axes(plt: Any, height: float = 2.8, rows: int = 1) -> tuple[Any, Any]:
    figure_and_axes: tuple[Any, Any] = plt.subplots(
        rows, 1, figsize=(7.5, height), layout="constrained", sharex=True, squeeze=False
    )
    return figure_and_axes


def _finish(ax: Any, ylabel: str, *, legend: bool = False) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(loc="best", fontsize="small")


def loss_figures(plt: Any, run: RunRecords) -> Figures:
    """Training loss (every step and its EMA, or the logged steps of an older run) and evaluation loss."""
    series = run.steps
    fig, axes = _axes(plt, 3.4)
    ax = axes[0][0]
    if series.every_step:
        ax.plot(series.step, series.loss, color="C0", alpha=0.3, lw=0.8, label="train, per step")
        ax.plot(series.step, ema(series.loss), color="C0", lw=1.8, label=f"train, EMA ({EMA_WEIGHT})")
        caption = "Loss: training (every step, mean over workers, and its moving average) and evaluation"
    else:
        ax.plot(series.step, series.loss, "o-", color="C0", ms=3, label="train, logged steps")
        caption = "Loss: training (logged steps, mean over workers) and evaluation"
    if run.evals:
        ax.plot([r["step"] for r in run.evals], [r["eval_loss"] for r in run.evals], "s-", color="C3")
        ax.lines[-1].set_label("evaluation")
    _finish(ax, "cross-entropy (nats/byte)", legend=True)
    return [(fig, "loss.png", caption)]


def _series_figure(
    plt: Any, series: StepSeries, values: list[float], name: str, ylabel: str, caption: str
) -> Figures:
    if not _has_values(values):
        return []
    fig, axes = _axes(plt, 2.4)
    style = "-" if series.every_step else "o-"
    axes[0][0].plot(series.step, values, style, ms=3, lw=1.0)
    _finish(axes[0][0], ylabel)
    return [(fig, name, caption)]


def lr_figures(plt: Any, run: RunRecords) -> Figures:
    """The learning rate of every step (warm-up, then cosine)."""
    return _series_figure(plt, run.steps, run.steps.lr, "lr.png", "learning rate", "Learning rate")


def aux_loss_figures(plt: Any, run: RunRecords) -> Figures:
    """The MoE layers' weighted auxiliary (load-balancing) loss."""
    caption = "Auxiliary loss of the MoE layers (weighted, mean over workers)"
    return _series_figure(plt, run.steps, run.steps.aux_loss, "aux_loss.png", "aux loss", caption)


def grad_norm_figures(plt: Any, run: RunRecords) -> Figures:
    """The whole model's gradient norm before clipping."""
    caption = "Gradient norm of the whole model, before clipping to 1"
    return _series_figure(plt, run.steps, run.steps.grad_norm, "grad_norm.png", "L2 norm", caption)


def throughput_figures(plt: Any, run: RunRecords) -> Figures:
    """Tokens per second of all workers between logged steps, from zero."""
    fig, axes = _axes(plt, 2.6)
    ax = axes[0][0]
    ax.plot([r["step"] for r in run.train], [r["tokens_per_s"] for r in run.train], "o-", ms=3)
    ax.set_ylim(bottom=0)
    _finish(ax, "tokens / s")
    return [(fig, "throughput.png", "Throughput (all workers, between logged steps)")]


def _window_edges(steps: Sequence[float]) -> list[float]:
    """Edges of the windows the logged snapshots stand for: ``(previous step, step]``."""
    first = steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1)
    return [first + 0.5, *(s + 0.5 for s in steps)]


def load_figures(plt: Any, run: RunRecords) -> Figures:
    """One heatmap per layer: each expert's share of the routed assignments at each logged step."""
    steps = [r["step"] for r in run.train]
    edges = _window_edges(steps)
    out: Figures = []
    for i in range(len(run.train[0]["layers"])):
        shares = []
        for r in run.train:
            routed = r["layers"][i]["routed"]
            total = sum(routed) or 1
            shares.append([c / total for c in routed])
        experts = len(shares[0])
        fig, axes = _axes(plt, 1.6 + 0.12 * experts)
        ax = axes[0][0]
        image = ax.pcolormesh(
            edges,
            [e - 0.5 for e in range(experts + 1)],
            list(zip(*shares, strict=True)),
            shading="flat",
            vmin=0,
        )
        fig.colorbar(image, ax=ax, label="share")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        caption = f"Expert load, layer {i}: share of the routed assignments (even: {1 / experts:.3f} each)"
        out.append((fig, f"load_layer{i}.png", caption))
    return out


def can_drop(run: RunRecords) -> bool:
    """Whether any assignment could be dropped: a drop happened, or a capacity limit was in force."""
    if any(d > 0 for layer in run.steps.layers for d in layer.dropped):
        return True
    capacities = [layer.get("capacity") for r in run.train for layer in r["layers"] if "capacity" in layer]
    if capacities:
        return any(c is not None for c in capacities)
    return bool(run.config.get("capacity_factor", 0.0) != 0.0)  # an older run: the setting says


def dropped_figures(plt: Any, run: RunRecords) -> Figures:
    """Share of assignments dropped by the capacity limit, per layer (only when a limit can drop)."""
    if not can_drop(run):
        return []
    fig, axes = _axes(plt, 2.6)
    series = run.steps
    for i, layer in enumerate(series.layers):
        assignments = max(1, run.train[-1]["layers"][i]["assignments"])
        axes[0][0].plot(series.step, [d / assignments for d in layer.dropped], lw=1.0, label=f"layer {i}")
    axes[0][0].set_ylim(bottom=0)
    _finish(axes[0][0], "dropped share", legend=True)
    return [(fig, "dropped.png", "Assignments dropped by the capacity limit")]


def plan_segments(steps: Sequence[int], labels: Sequence[str]) -> list[tuple[float, float, str]]:
    """``(start, width, label)`` of each run of equal labels; step ``s`` covers ``(previous step, s]``."""
    if not steps:
        return []
    edges = _window_edges(steps)
    out: list[tuple[float, float, str]] = []
    for j, label in enumerate(labels):
        if out and out[-1][2] == label:
            start, _, _ = out[-1]
            out[-1] = (start, edges[j + 1] - start, label)
        else:
            out.append((edges[j], edges[j + 1] - edges[j], label))
    return out


def plans_figures(plt: Any, run: RunRecords) -> Figures:
    """The plan each layer ran, one row per layer, when the plan changed (``--plan auto``)."""
    series = run.steps
    plans = sorted({p for layer in series.layers for p in layer.plan})
    if len(plans) < 2:
        return []
    colours = plt.get_cmap("tab10" if len(plans) <= 10 else "tab20").colors
    colour = {plan: colours[k % len(colours)] for k, plan in enumerate(plans)}
    fig, axes = _axes(plt, 1.6 + 0.5 * len(series.layers) + 0.25 * math.ceil(len(plans) / 3))
    ax = axes[0][0]
    searched = False
    for i, layer in enumerate(series.layers):
        for start, width, plan in plan_segments(series.step, layer.plan):
            ax.broken_barh([(start, width)], (i - 0.4, 0.8), facecolors=colour[plan])
        phases = ["search" if t == "search" else "" for t in layer.tuner]
        for start, width, phase in plan_segments(series.step, phases):
            if phase:
                searched = True
                ax.broken_barh(
                    [(start, width)], (i - 0.4, 0.8), facecolors="none", edgecolors="0.25", hatch="///", lw=0
                )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[p], label=p) for p in plans]
    if searched:
        handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, hatch="///", label="tuner measuring"))
    ax.set_yticks(range(len(series.layers)), [f"layer {i}" for i in range(len(series.layers))])
    ax.set_ylim(len(series.layers) - 0.5, -0.5)
    ax.set_xlabel("step")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small")
    return [(fig, "plans.png", "Parallel plan per layer over time (the online tuner's choices)")]


def rerouting_figures(plt: Any, run: RunRecords) -> Figures:
    """Rows computed away from their expert's rank, and expert copies sent, per layer (when any)."""
    layers = run.steps.layers
    values = [v for layer in layers for v in (*layer.rerouted_rows, *layer.expert_copies)]
    if not any(v > 0 for v in values if not math.isnan(v)):
        return []
    fig, axes = _axes(plt, 4.2, rows=2)
    for i, layer in enumerate(layers):
        axes[0][0].plot(run.steps.step, layer.rerouted_rows, lw=1.0, label=f"layer {i}")
        axes[1][0].plot(run.steps.step, layer.expert_copies, lw=1.0, label=f"layer {i}")
    _finish(axes[0][0], "rerouted rows", legend=True)
    _finish(axes[1][0], "expert copies")
    axes[0][0].set_xlabel("")
    return [(fig, "rerouting.png", "Rerouting: rows computed on another rank, and expert copies sent")]


FIGURES: list[Callable[[Any, RunRecords], Figures]] = [
    loss_figures,
    lr_figures,
    aux_loss_figures,
    grad_norm_figures,
    throughput_figures,
    load_figures,
    adaptive_figures,
    dropped_figures,
    plans_figures,
    rerouting_figures,
]
