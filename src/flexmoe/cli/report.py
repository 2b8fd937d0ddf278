"""``flexmoe report RUN_DIR``: an HTML page and PNG plots of a ``flexmoe train`` run.

Reads ``metrics.jsonl``, ``config.json`` and ``summary.json`` from the run directory
and writes, next to them, ``report.html`` and:

- ``loss.png``: training loss per logged step and evaluation loss;
- ``throughput.png``: tokens per second;
- ``load_layer<i>.png``: per-expert share of the routed assignments over time, per layer
  (a heatmap: an even router is a flat colour, a hot expert a bright row);
- ``dropped.png``: share of assignments dropped by the capacity limit, per layer;
- ``plans.png``: the parallel plan each layer ran with over time.

Every file is checked as it is read: a missing, unreadable or malformed one ends in
one line naming the file (and the line of ``metrics.jsonl``), never a traceback.
Needs matplotlib (``pip install 'flexmoe[report]'``).
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmoe.cli.options import CliError

__all__ = ["RunRecords", "add_report_arguments", "read_run", "render_report", "run_report"]


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``flexmoe report``."""
    parser.add_argument("run_dir", type=Path, help="a directory written by `flexmoe train`")


@dataclass(frozen=True, kw_only=True)
class RunRecords:
    """What a run directory holds, checked: logged training steps, evaluations, settings, summary."""

    train: list[dict[str, Any]]  # metrics records with "loss" and per-layer "layers"
    evals: list[dict[str, Any]]  # metrics records with "eval_loss"
    config: dict[str, Any]
    summary: dict[str, Any]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(
            f"{path}: not UTF-8 text (byte {error.start}); is it a file `flexmoe train` wrote?"
        ) from None
    except OSError as error:
        raise CliError(f"{path}: cannot read it ({error.strerror})") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file, ``{}`` when absent (``config.json`` and ``summary.json`` are optional)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise CliError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, dict):
        raise CliError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_train_record(record: dict[str, Any], where: str, num_layers: int | None) -> None:
    """Refuse a training record without the fields the plots read (``where`` names its file and line)."""
    for key in ("step", "loss", "tokens_per_s"):
        if not _is_number(record.get(key)):
            raise CliError(f"{where}: {key!r} must be a number, got {record.get(key)!r}")
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers or (num_layers is not None and len(layers) != num_layers):
        expected = "a non-empty list" if num_layers is None else f"a list of {num_layers} layers"
        raise CliError(f"{where}: 'layers' must be {expected}")
    for layer in layers:
        ok = (
            isinstance(layer, dict)
            and isinstance(layer.get("routed"), list)
            and layer["routed"]
            and all(_is_number(c) for c in layer["routed"])
            and _is_number(layer.get("dropped"))
            and _is_number(layer.get("assignments"))
            and isinstance(layer.get("plan"), str)
        )
        if not ok:
            raise CliError(
                f"{where}: each layer needs 'routed' (numbers), 'dropped', 'assignments' and 'plan'"
            )
    if len({len(layer["routed"]) for layer in layers}) != 1:
        raise CliError(f"{where}: the layers' 'routed' lists differ in length")


def read_run(run_dir: Path) -> RunRecords:
    """Read and check ``run_dir``'s ``metrics.jsonl``, ``config.json`` and ``summary.json``."""
    if not run_dir.is_dir():
        raise CliError(f"{run_dir} is not a directory: expected a `flexmoe train` run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CliError(f"{path} is missing: is {run_dir} a `flexmoe train` run directory?")
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"{where}: not a JSON line ({error.msg})") from None
        if not isinstance(record, dict):
            raise CliError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "eval_loss" in record:
            if not (_is_number(record.get("step")) and _is_number(record["eval_loss"])):
                raise CliError(f"{where}: an evaluation needs a numeric 'step' and 'eval_loss'")
            evals.append(record)
        else:
            _check_train_record(record, where, len(train[0]["layers"]) if train else None)
            train.append(record)
    if not train:
        raise CliError(f"{path} holds no training steps yet")
    experts = {len(r["layers"][0]["routed"]) for r in train}
    if len(experts) != 1:
        raise CliError(f"{path}: the records disagree on the number of experts ({sorted(experts)})")
    return RunRecords(
        train=train,
        evals=evals,
        config=_read_json_object(run_dir / "config.json"),
        summary=_read_json_object(run_dir / "summary.json"),
    )


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

    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        figures.append((name, caption))

    for draw in (_loss_figure, _throughput_figure, _load_figures, _dropped_figure, _plans_figure):
        for fig, name, caption in draw(plt, run):
            save(fig, name, caption)
    out = run_dir / "report.html"
    out.write_text(_page(run_dir, run, figures), encoding="utf-8")
    return out


Figures = list[tuple[Any, str, str]]  # (figure, file name, caption)


def _steps(run: RunRecords) -> list[float]:
    return [r["step"] for r in run.train]


def _loss_figure(plt: Any, run: RunRecords) -> Figures:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(_steps(run), [r["loss"] for r in run.train], label="train (mean over workers)")
    if run.evals:
        ax.plot([r["step"] for r in run.evals], [r["eval_loss"] for r in run.evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    return [(fig, "loss.png", "Loss")]


def _throughput_figure(plt: Any, run: RunRecords) -> Figures:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(_steps(run), [r["tokens_per_s"] for r in run.train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s (all workers)")
    ax.grid(alpha=0.3)
    return [(fig, "throughput.png", "Throughput")]


def _load_figures(plt: Any, run: RunRecords) -> Figures:
    """One heatmap per layer: each expert's share of the routed assignments over time."""
    steps = _steps(run)
    out: Figures = []
    for i in range(len(run.train[0]["layers"])):
        shares = []
        for r in run.train:
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
        caption = f"Expert load, layer {i} (even: {1 / len(shares[0]):.3f} each)"
        out.append((fig, f"load_layer{i}.png", caption))
    return out


def _dropped_figure(plt: Any, run: RunRecords) -> Figures:
    fig, ax = plt.subplots(figsize=(7, 3))
    for i in range(len(run.train[0]["layers"])):
        rates = [r["layers"][i]["dropped"] / max(1, r["layers"][i]["assignments"]) for r in run.train]
        ax.plot(_steps(run), rates, label=f"layer {i}")
    ax.set_xlabel("step")
    ax.set_ylabel("dropped share")
    ax.legend()
    ax.grid(alpha=0.3)
    return [(fig, "dropped.png", "Dropped assignments (capacity limit)")]


def _plans_figure(plt: Any, run: RunRecords) -> Figures:
    plans = sorted({layer["plan"] for r in run.train for layer in r["layers"]})
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(plans)))
    for i in range(len(run.train[0]["layers"])):
        ax.plot(
            _steps(run), [plans.index(r["layers"][i]["plan"]) for r in run.train], ".", label=f"layer {i}"
        )
    ax.set_yticks(range(len(plans)), plans)
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
    return [(fig, "plans.png", "Parallel plan per layer")]


def _page(run_dir: Path, run: RunRecords, figures: list[tuple[str, str]]) -> str:
    """The HTML page: the figures, then the summary and settings as a table."""
    rows = {
        **{f"summary: {k}": v for k, v in run.summary.items()},
        **{f"setting: {k}": v for k, v in run.config.items()},
    }
    table = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items()
    )
    images = "\n".join(
        f'<figure><img src="{name}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for name, c in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flexmoe run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:1em}}
img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head>
<body><h1>flexmoe run <code>{html.escape(str(run_dir))}</code></h1>
{images}
<h2>Run</h2><table>{table}</table>
</body></html>
"""


def run_report(args: argparse.Namespace) -> None:
    """Render and say where."""
    out = render_report(args.run_dir)
    print(f"wrote {out} and {len(list(args.run_dir.glob('*.png')))} plots")
