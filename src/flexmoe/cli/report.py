"""``flexmoe report RUN_DIR``: an HTML page and PNG plots of a ``flexmoe train`` run.

Reads ``metrics.jsonl``, ``config.json`` and ``summary.json`` from the run directory
(``report_read``) and writes, next to them, ``report.html``: a summary table (rounded,
with units), the plots (``report_plots``) and the run's settings. The plots:

- ``loss.png``: training loss of every step and its moving average (an older run
  directory: of the logged steps), and evaluation loss;
- ``lr.png``, ``aux_loss.png``, ``grad_norm.png``: learning rate, auxiliary loss and
  gradient norm (before clipping) per step, when the run recorded them;
- ``throughput.png``: tokens per second, from zero;
- ``load_layer<i>.png``: per-expert share of the routed assignments over time, per layer
  (a heatmap: an even router is a flat colour, a hot expert a bright row);
- ``experts_per_token.png`` and ``experts_per_token_hist.png``: mean routed experts per
  token per layer over the steps (with top-p and the skip rate of zero-computation
  experts when they vary), and the tokens by number of experts
  (``report_adaptive``), when the number of experts per token varies;
- ``dropped.png``: share of assignments dropped, only when a capacity limit could drop
  (a dropless run says "dropless" in the summary instead);
- ``plans.png``: the plan each layer ran, one row per layer, when it changed;
- ``rerouting.png``: rerouted rows and expert copies, when there were any.

Needs matplotlib (``pip install 'flexmoe[report]'``).
"""

from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any

from flexmoe.cli.options import CliError
from flexmoe.cli.report_adaptive import adaptive_summary
from flexmoe.cli.report_plots import FIGURES, can_drop, ema
from flexmoe.cli.report_read import RunRecords, read_run

__all__ = [
    "RunRecords",
    "add_report_arguments",
    "read_run",
    "render_report",
    "run_report",
    "settings_rows",
    "summary_rows",
]

MISSING = "—"  # what a table shows for a value the run did not record


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``flexmoe report``."""
    parser.add_argument("run_dir", type=Path, help="a directory written by `flexmoe train`")


def render_report(run_dir: Path) -> Path:
    """Write the plots and ``report.html`` into ``run_dir``; returns the HTML path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the report extra installs it
        raise CliError("flexmoe report needs matplotlib: pip install 'flexmoe[report]'") from error
    run = read_run(run_dir)
    figures: list[tuple[str, str]] = []
    for draw in FIGURES:
        for fig, name, caption in draw(plt, run):
            fig.savefig(run_dir / name, dpi=100)
            plt.close(fig)
            figures.append((name, caption))
    out = run_dir / "report.html"
    out.write_text(_page(run_dir, run, figures), encoding="utf-8")
    return out


def _number(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` (absent, ``null``, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _plan_summary(run: RunRecords) -> str:
    plans = sorted({p for layer in run.steps.layers for p in layer.plan})
    if len(plans) == 1:
        return f"{plans[0]} (every layer, every step)"
    return f"{len(plans)} plans over the run (see the plan chart): {', '.join(plans)}"


def _drop_summary(run: RunRecords) -> str:
    factor = _number(run.config.get("capacity_factor"))
    setting = "" if factor is None else f"capacity factor {factor:g}"
    if not can_drop(run):
        return f"dropless ({setting})" if setting else "dropless"
    dropped = sum(sum(layer.dropped) for layer in run.steps.layers)
    assignments = sum(
        run.train[-1]["layers"][i]["assignments"] * len(run.steps.step) for i in range(len(run.steps.layers))
    )
    share = 100 * dropped / max(1, assignments)
    text = f"{dropped:,.0f} of {assignments:,} assignments ({share:.2f} %)"
    return f"{text}, {setting}" if setting else text


def _rerouting_summary(run: RunRecords) -> str | None:
    rows = [v for layer in run.steps.layers for v in layer.rerouted_rows if not math.isnan(v)]
    copies = [v for layer in run.steps.layers for v in layer.expert_copies if not math.isnan(v)]
    if not rows and not copies:
        return None  # an older run that did not record it
    if not any(rows) and not any(copies):
        return "none"
    return f"{sum(rows):,.0f} rows computed on another rank, {sum(copies):,.0f} expert copies sent"


def _train_loss_summary(run: RunRecords) -> str:
    series = run.steps
    if series.every_step:
        return f"{ema(series.loss)[-1]:.3f} nats/byte (moving average at step {series.step[-1]:,})"
    return f"{series.loss[-1]:.3f} nats/byte (step {series.step[-1]:,})"


def _grad_norm_summary(run: RunRecords) -> str | None:
    norms = [v for v in run.steps.grad_norm if not math.isnan(v)]
    if not norms:
        return None
    return f"{norms[-1]:.3g} at the end, {max(norms):.3g} at most (before clipping to 1)"


def _summary_facts(summary: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What ``summary.json`` says, formatted; ``None`` for a field it lacks."""
    steps, tokens = _number(summary.get("steps")), _number(summary.get("tokens"))
    seconds, rate = _number(summary.get("seconds")), _number(summary.get("tokens_per_s"))
    initial, final = _number(summary.get("initial_eval_loss")), _number(summary.get("final_eval_loss"))
    world = _number(summary.get("world_size"))
    losses = None if initial is None or final is None else f"{initial:.3f} → {final:.3f} nats/byte"
    rows = [
        ("steps trained", None if steps is None else f"{steps:,.0f}"),
        ("tokens trained", None if tokens is None else f"{tokens:,.0f}"),
        ("wall time", None if seconds is None else _duration(seconds)),
        ("throughput", None if rate is None else f"{rate:,.0f} tokens/s (all workers)"),
        ("evaluation loss", losses),
        ("workers", None if world is None else f"{world:.0f}"),
        ("expert backend", summary.get("expert_backend")),
        ("checkpoint", summary.get("checkpoint")),
    ]
    if summary.get("trace") is not None:
        rows.append(("routing trace", str(summary["trace"])))
    rows += [(key.replace("_", " "), _setting(value)) for key, value in summary.items() if key not in _KNOWN]
    return [(label, None if value is None else str(value)) for label, value in rows]


_KNOWN = {"steps", "tokens", "seconds", "tokens_per_s", "initial_eval_loss", "final_eval_loss"}
_KNOWN |= {"world_size", "expert_backend", "checkpoint", "trace"}


def summary_rows(run: RunRecords) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the summary table: rounded, with units, never ``None``.

    A ``summary.json`` field the file lacks shows as ``—`` (no ``summary.json`` at all,
    as in a run still going: those rows are left out); a fact the metrics did not record
    (the gradient norm of an older run) is left out.
    """
    facts = [(label, MISSING if value is None else value) for label, value in _summary_facts(run.summary)]
    facts = facts if run.summary else []
    derived = [
        ("training loss", _train_loss_summary(run)),
        ("gradient norm", _grad_norm_summary(run)),
        ("dropped assignments", _drop_summary(run)),
        ("experts per token", adaptive_summary(run)),
        ("parallel plan", _plan_summary(run)),
        ("rerouting", _rerouting_summary(run)),
    ]
    known = [(label, value) for label, value in derived if value is not None]
    return facts[:5] + known + facts[5:]  # the run's size and losses, what it did, where it ran


def _setting(value: object) -> str:
    """A setting as a reader wants it: ``—`` for none, ``yes``/``no``, 4 significant digits."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def settings_rows(run: RunRecords) -> list[tuple[str, str]]:
    """``(option, value)`` of every setting in ``config.json``, as ``--option`` names."""
    return [(f"--{key.replace('_', '-')}", _setting(value)) for key, value in run.config.items()]


def _table(rows: list[tuple[str, str]]) -> str:
    cells = (f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return "<table>" + "\n".join(cells) + "</table>"


def _page(run_dir: Path, run: RunRecords, figures: list[tuple[str, str]]) -> str:
    """The HTML page: the summary, the figures, then the settings."""
    images = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in figures
    )
    settings = settings_rows(run)
    settings_html = f"<h2>Settings</h2>{_table(settings)}" if settings else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flexmoe run {html.escape(run_dir.name)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:84em;margin:1.5em auto;padding:0 1em;color:#222}}
h1{{font-size:1.4em}} h2{{font-size:1.15em;margin-top:1.5em}}
table{{border-collapse:collapse}} th,td{{padding:.15em 1em .15em 0;vertical-align:top}}
th{{text-align:left;font-weight:600}} td{{font-variant-numeric:tabular-nums}}
.plots{{display:grid;grid-template-columns:repeat(auto-fill,minmax(32em,1fr));gap:0 2em}}
img{{max-width:100%}} figure{{margin:1em 0}} figcaption{{font-size:.9em;color:#555}}
</style></head>
<body><h1>flexmoe run <code>{html.escape(run_dir.name)}</code></h1>
<h2>Summary</h2>{_table(summary_rows(run))}
<h2>Plots</h2>
<div class="plots">
{images}
</div>
{settings_html}
</body></html>
"""


def run_report(args: argparse.Namespace) -> None:
    """Render and say where."""
    out = render_report(args.run_dir)
    figures = out.read_text(encoding="utf-8").count("<img ")
    print(f"wrote {out} and {figures} plots")
