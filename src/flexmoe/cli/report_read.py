"""Reading a ``flexmoe train`` run directory for ``flexmoe report``: checked records and per-step series.

Every file is checked as it is read: a missing, unreadable or malformed one ends in one
line naming the file (and the line of ``metrics.jsonl``), never a traceback. Both
``metrics.jsonl`` formats are read: a logged record with ``per_step`` columns (every
training step) and an older one without (one point per logged step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from flexmoe.cli.options import CliError

__all__ = ["LayerSeries", "RunRecords", "StepSeries", "read_run"]

NAN = math.nan  # a value an older record does not hold: a gap in its plot


@dataclass(frozen=True, kw_only=True)
class LayerSeries:
    """One MoE layer's per-step facts (one entry per ``StepSeries.step``)."""

    plan: list[str]
    tuner: list[str | None]  # the online tuner's phase ("search", "tuned", "retune"), None without it
    dropped: list[float]
    rerouted_rows: list[float]  # NAN where the record does not say
    expert_copies: list[float]  # NAN where the record does not say


@dataclass(frozen=True, kw_only=True)
class StepSeries:
    """The training scalars over the run, ordered by step, one entry per step recorded.

    ``every_step`` says whether that is every training step (a run with ``per_step``
    columns) or only the logged ones (an older run directory). A step recorded twice
    (a resume from before the last logged step) keeps its newest value.
    """

    step: list[int]
    loss: list[float]  # mean over workers
    lr: list[float]
    aux_loss: list[float]
    grad_norm: list[float]
    layers: list[LayerSeries]
    every_step: bool


@dataclass(frozen=True, kw_only=True)
class RunRecords:
    """What a run directory holds, checked: logged training steps, evaluations, settings, summary."""

    train: list[dict[str, Any]]  # logged records with "loss", "tokens_per_s" and per-layer "layers"
    evals: list[dict[str, Any]]  # records with "eval_loss"
    config: dict[str, Any]
    summary: dict[str, Any]
    steps: StepSeries


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
    if "per_step" in record:
        _check_per_step(record["per_step"], where, len(layers))


def _check_per_step(per_step: object, where: str, num_layers: int) -> None:
    """Refuse ``per_step`` columns of unequal length or of the wrong types."""
    where = f"{where}: 'per_step'"
    if not isinstance(per_step, dict) or not isinstance(per_step.get("step"), list):
        raise CliError(f"{where} must be an object with a 'step' list")
    length = len(per_step["step"])
    for key in ("step", "loss", "lr", "aux_loss", "grad_norm"):
        column = per_step.get(key)
        if not (isinstance(column, list) and len(column) == length and all(map(_is_number, column))):
            raise CliError(f"{where}: {key!r} must be a list of {length} numbers")
    layers = per_step.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise CliError(f"{where}: 'layers' must be a list of {num_layers} layers")
    for layer in layers:
        ok = isinstance(layer, dict) and all(
            isinstance(layer.get(key), list) and len(layer[key]) == length for key in _LayerPoint._fields
        )
        if not ok or not all(isinstance(p, str) for p in layer["plan"]):
            raise CliError(
                f"{where}: each layer needs 'plan', 'tuner', 'dropped', 'rerouted_rows' and "
                f"'expert_copies' lists of {length} entries"
            )


class _LayerPoint(NamedTuple):
    plan: str
    tuner: str | None
    dropped: float
    rerouted_rows: float
    expert_copies: float


class _StepPoint(NamedTuple):
    loss: float
    lr: float
    aux_loss: float
    grad_norm: float
    layers: list[_LayerPoint]


_LAYER_KEYS = _LayerPoint._fields


def _points(record: dict[str, Any]) -> dict[int, _StepPoint]:
    """The steps a logged record holds: its ``per_step`` columns, or (an older record) its own step."""
    columns = record.get("per_step")
    if columns is None:
        layers = [
            _LayerPoint(
                plan=layer["plan"],
                tuner=layer.get("tuner"),
                dropped=layer["dropped"],
                rerouted_rows=layer.get("rerouted_rows", NAN),
                expert_copies=layer.get("expert_copies", NAN),
            )
            for layer in record["layers"]
        ]
        point = _StepPoint(
            loss=record["loss"],
            lr=record.get("lr", NAN),
            aux_loss=record.get("aux_loss", NAN),
            grad_norm=record.get("grad_norm", NAN),
            layers=layers,
        )
        return {record["step"]: point}
    out = {}
    for j, step in enumerate(columns["step"]):
        layers = [_LayerPoint(*(layer[key][j] for key in _LAYER_KEYS)) for layer in columns["layers"]]
        out[step] = _StepPoint(
            loss=columns["loss"][j],
            lr=columns["lr"][j],
            aux_loss=columns["aux_loss"][j],
            grad_norm=columns["grad_norm"][j],
            layers=layers,
        )
    return out


def _step_series(train: list[dict[str, Any]]) -> StepSeries:
    points: dict[int, _StepPoint] = {}
    for record in train:  # file order: a step redone after a resume replaces the older value
        points.update(_points(record))
    steps = sorted(points)
    rows = [points[s] for s in steps]
    layers = [
        LayerSeries(
            plan=[row.layers[i].plan for row in rows],
            tuner=[row.layers[i].tuner for row in rows],
            dropped=[row.layers[i].dropped for row in rows],
            rerouted_rows=[row.layers[i].rerouted_rows for row in rows],
            expert_copies=[row.layers[i].expert_copies for row in rows],
        )
        for i in range(len(train[0]["layers"]))
    ]
    return StepSeries(
        step=steps,
        loss=[row.loss for row in rows],
        lr=[row.lr for row in rows],
        aux_loss=[row.aux_loss for row in rows],
        grad_norm=[row.grad_norm for row in rows],
        layers=layers,
        every_step=all("per_step" in record for record in train),
    )


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
        steps=_step_series(train),
    )
