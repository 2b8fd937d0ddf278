"""The adaptive-computation figures and summary of ``flexmoe report``: experts per token, skip rate, top-p.

Read from the raw ``metrics.jsonl`` records (``RunRecords.train``): each logged record's
``per_step`` layer columns ``experts_per_token``, ``skip_rate`` and ``top_p`` (every
step; an older run: the logged snapshot's ``experts_per_token``) and each snapshot's
``experts_per_token_hist``. A fixed top-k run without zero experts shows none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flexmoe.cli.report_read import RunRecords

__all__ = ["AdaptiveSeries", "adaptive_figures", "adaptive_series", "adaptive_summary"]

Figures = list[tuple[Any, str, str]]


@dataclass(frozen=True)
class AdaptiveSeries:
    """Per layer, per recorded step: mean experts per token, skip rate, top-p (NaN where not recorded)."""

    step: list[int]
    experts_per_token: list[list[float]]  # [layer][step]
    skip_rate: list[list[float]]
    top_p: list[list[float]]
    hist: list[list[int]]  # [layer][k]: tokens that used k routed experts, summed over the logged snapshots


def _number(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.nan  # type: ignore[arg-type]


def adaptive_series(run: RunRecords) -> AdaptiveSeries:
    """The per-layer series of every step the records hold (a step redone after a resume: the newest)."""
    layers = len(run.train[0]["layers"])
    points: dict[int, list[tuple[float, float, float]]] = {}
    hist: list[list[int]] = [[] for _ in range(layers)]
    for record in run.train:
        columns = record.get("per_step")
        if isinstance(columns, dict) and all("experts_per_token" in c for c in columns["layers"]):
            for j, step in enumerate(columns["step"]):
                points[step] = [
                    (_number(c["experts_per_token"][j]), _number(c["skip_rate"][j]), _number(c["top_p"][j]))
                    for c in columns["layers"]
                ]
        else:
            snapshot = record["layers"]
            points[record["step"]] = [
                (_number(s.get("experts_per_token")), _number(s.get("skip_rate")), _number(s.get("top_p")))
                for s in snapshot
            ]
        for i, snapshot in enumerate(record["layers"]):
            counts = snapshot.get("experts_per_token_hist")
            if isinstance(counts, list) and all(isinstance(c, int) for c in counts):
                hist[i] = [
                    a + b
                    for a, b in zip(_padded(hist[i], len(counts)), _padded(counts, len(hist[i])), strict=True)
                ]
    steps = sorted(points)
    return AdaptiveSeries(
        step=steps,
        experts_per_token=[[points[s][i][0] for s in steps] for i in range(layers)],
        skip_rate=[[points[s][i][1] for s in steps] for i in range(layers)],
        top_p=[[points[s][i][2] for s in steps] for i in range(layers)],
        hist=hist,
    )


def _padded(values: list[int], length: int) -> list[int]:
    return values + [0] * max(0, length - len(values))


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _varies(rows: list[list[float]]) -> bool:
    flat = _finite([v for row in rows for v in row])
    return bool(flat) and max(flat) - min(flat) > 1e-9


def adaptive_figures(plt: Any, run: RunRecords) -> Figures:
    """Mean experts per token per layer over the steps (and top-p, the skip rate) and their histogram.

    Drawn when the number of experts per token varies (top-p, zero-computation experts,
    a layer schedule) or layers differ; a plain fixed top-k run gets none.
    """
    series = adaptive_series(run)
    skips = any(v > 0 for row in series.skip_rate for v in _finite(row))
    if not _varies(series.experts_per_token) and not skips:
        return []
    panels = 1 + _varies(series.top_p) + skips
    fig, axes = plt.subplots(
        panels, 1, figsize=(7.5, 2.4 * panels), layout="constrained", sharex=True, squeeze=False
    )
    panel = iter(axes[:, 0])
    ax = next(panel)
    for i, values in enumerate(series.experts_per_token):
        ax.plot(series.step, values, lw=1.0, label=f"layer {i}")
    ax.set_ylabel("experts per token")
    ax.legend(loc="best", fontsize="small")
    if _varies(series.top_p):
        ax = next(panel)
        for i, values in enumerate(series.top_p):
            ax.plot(series.step, values, lw=1.0, label=f"layer {i}")
        ax.set_ylabel("top-p")
    if skips:
        ax = next(panel)
        for i, values in enumerate(series.skip_rate):
            ax.plot(series.step, values, lw=1.0, label=f"layer {i}")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("skip rate")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    out: Figures = [
        (fig, "experts_per_token.png", "Mean routed experts per token per layer (and top-p, skip rate)")
    ]
    if any(series.hist):
        fig, axes = plt.subplots(1, 1, figsize=(7.5, 2.6), layout="constrained", squeeze=False)
        ax = axes[0][0]
        width = 0.8 / len(series.hist)
        for i, counts in enumerate(series.hist):
            total = max(1, sum(counts))
            ax.bar(
                [k + (i - (len(series.hist) - 1) / 2) * width for k in range(len(counts))],
                [c / total for c in counts],
                width=width,
                label=f"layer {i}",
            )
        ax.set_xlabel("routed experts per token")
        ax.set_ylabel("share of tokens")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="best", fontsize="small")
        caption = "Tokens by number of routed experts (the logged steps together)"
        out.append((fig, "experts_per_token_hist.png", caption))
    return out


def adaptive_summary(run: RunRecords) -> str | None:
    """``"layer 0: 1.52, layer 1: 1.48 (mean over the steps); skip rate 21 %, 24 %"``, or ``None``."""
    series = adaptive_series(run)
    means = [_finite(values) for values in series.experts_per_token]
    if not all(means):
        return None
    text = (
        ", ".join(f"layer {i}: {sum(v) / len(v):.2f}" for i, v in enumerate(means)) + " (mean over the steps)"
    )
    skips = [_finite(values) for values in series.skip_rate]
    if all(skips) and any(v > 0 for row in skips for v in row):
        text += "; skip rate " + ", ".join(f"{100 * sum(v) / len(v):.0f} %" for v in skips)
    return text
