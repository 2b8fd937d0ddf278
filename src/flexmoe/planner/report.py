"""Text tables and plots of the planner's predictions (what ``flexmoe plan`` prints and draws)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from flexmoe.planner.prediction import Prediction
from flexmoe.planner.search import PlanReport

__all__ = ["format_plan", "format_sweep", "plot_sweep", "sweep_rows"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def _row(p: Prediction) -> str:
    b = p.breakdown
    x = p.exchange
    fits = "" if p.fits else " OOM"
    return (
        f"{p.plan.label:24s} {_ms(p.time)} {_ms(b.exchange)} {_ms(b.experts)} {p.overlap * 100:6.0f}% "
        f"{_ms(b.weight_gather)} {_ms(b.rerouting)} {_ms(b.metadata)} {x.messages:6d} "
        f"{x.mean_message_bytes / 1e3:10.1f} {p.peak_memory / 1e9:8.2f}{fits:4s} "
        f"{p.dropped_fraction * 100:6.1f}%"
    )


_HEADER = (
    f"{'plan':24s} {'step ms':>9s} {'exch ms':>9s} {'expert ms':>9s} {'overlap':>7s} {'gather ms':>9s} "
    f"{'reroute':>9s} {'meta ms':>9s} {'msgs':>6s} {'KB/msg':>10s} {'mem GB':>8s}{'':4s} {'dropped':>7s}"
)


def format_plan(report: PlanReport, top: int = 12) -> str:
    """The best plan, the ``top`` fastest candidates, the baselines and the speedups."""
    best = report.best
    lines = [
        f"{report.world_size} devices, load {report.load}: best plan {best.plan.label}, "
        f"{best.time * 1e3:.2f} ms per step" + ("" if best.fits else " (nothing fits in memory)"),
        "  speedup over static baselines: "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in report.speedups().items()),
        "",
        _HEADER,
        "-" * len(_HEADER),
    ]
    lines += [_row(p) for p in report.predictions[:top]]
    if len(report.predictions) > top:
        lines.append(f"... {len(report.predictions) - top} more candidates")
    lines.append("baselines (fixed capacity, padded, d=1, flat):")
    lines += [_row(p) for p in report.baselines]
    lines.append(
        "exch/expert ms: before overlap; msgs and KB/msg: one all-to-all of one chunk (busiest rank); "
        "dropped: assignments over capacity"
    )
    return "\n".join(lines)


def sweep_rows(reports: Sequence[PlanReport]) -> list[dict[str, object]]:
    """One row per device count: the best plan and every strategy's time (for tables, JSON and plots)."""
    rows = []
    for r in reports:
        row: dict[str, object] = {
            "devices": r.world_size,
            "best_plan": r.best.plan.label,
            "best_s": r.best.time,
            "best_fits": r.best.fits,
            "best_dropped": r.best.dropped_fraction,
            "default_plan_s": r.default.time,
        }
        for b in r.baselines:
            row[f"{b.plan.label}_s"] = b.time
            row[f"{b.plan.label}_dropped"] = b.dropped_fraction
        for name, ratio in r.speedups().items():
            row[f"speedup_vs_{name}"] = ratio
        rows.append(row)
    return rows


def format_sweep(reports: Sequence[PlanReport]) -> str:
    """A table across device counts: best plan, its time, the baselines' and the speedups."""
    names = [b.plan.label for b in reports[0].baselines]
    header = (
        f"{'devices':>7s} {'best plan':24s} {'best ms':>9s} {'dropped':>7s} {'flat d=1':>9s} "
        + " ".join(f"{n + ' ms':>15s} {'speedup':>7s} {'dropped':>7s}" for n in names)
    )
    lines = [header, "-" * len(header)]
    for row in sweep_rows(reports):
        cells = " ".join(
            f"{row[f'{n}_s'] * 1e3:15.2f} {row[f'speedup_vs_{n}']:6.2f}x {row[f'{n}_dropped'] * 100:6.1f}%"  # type: ignore[operator]
            for n in names
        )
        fits = "" if row["best_fits"] else " (OOM)"
        lines.append(
            f"{row['devices']:7d} {str(row['best_plan']) + fits:24s} {row['best_s'] * 1e3:9.2f} "  # type: ignore[operator]
            f"{row['best_dropped'] * 100:6.1f}% {row['default_plan_s'] * 1e3:9.2f} {cells}"  # type: ignore[operator]
        )
    lines.append(
        "flat d=1: flexmoe's default plan (no pipelining, flat all-to-all, no rerouting), "
        "same capacity policy"
    )
    return "\n".join(lines)


def plot_sweep(reports: Sequence[PlanReport], path: str | Path, title: str = "") -> list[Path]:
    """Step time and speedup vs device count per strategy; writes ``path`` as PNG and SVG.

    Needs matplotlib (``pip install flexmoe[report]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install 'flexmoe[report]'") from error
    rows = sweep_rows(reports)
    devices = [int(r["devices"]) for r in rows]  # type: ignore[call-overload]
    names = [b.plan.label for b in reports[0].baselines]
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(devices, [1e3 * float(r["best_s"]) for r in rows], "o-", label="flexmoe adaptive (best plan)")  # type: ignore[arg-type]
    ax_t.plot(devices, [1e3 * float(r["default_plan_s"]) for r in rows], "s--", label="flexmoe, flat d=1")  # type: ignore[arg-type]
    for n in names:
        ax_t.plot(devices, [1e3 * float(r[f"{n}_s"]) for r in rows], "^:", label=n)  # type: ignore[arg-type]
        ax_s.plot(devices, [float(r[f"speedup_vs_{n}"]) for r in rows], "o-", label=f"adaptive vs {n}")  # type: ignore[arg-type]
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("predicted step time (ms, fwd + bwd)")
    ax_t.set_yscale("log")
    ax_s.set_ylabel("speedup (baseline time / adaptive time)")
    ax_s.axhline(1.0, color="gray", lw=0.8)
    if title:
        fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    stem = base.with_suffix("") if base.suffix in (".png", ".svg") else base
    written = []
    for suffix in (".png", ".svg"):
        out = stem.with_suffix(suffix)
        fig.savefig(out, dpi=120)
        written.append(out)
    plt.close(fig)
    return written
