"""``TrainConfig``: every setting of ``flexmoe train``, typed and checked once, from flags and ``--config``.

The dataclass is the one description of the options: the parser is generated from its
fields (flag, help line, default), a ``--config`` file (TOML or JSON; keys are the
option names, ``-`` or ``_``) fills the same fields, and the command line wins. Every
value is checked in ``__post_init__`` — types (``steps = 3.5``, ``steps = true`` and
``resume = 5`` are refused), ranges, choices and cross-field rules (``top_k <= experts``,
the experts fit the workers) — so a bad value ends in one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from flexmoe.cli.options import (
    CliError,
    OptionError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_path,
    describe_default,
    option_flag,
)
from flexmoe.cli.train_adaptive import check_routing_options
from flexmoe.config import Plan
from flexmoe.placement import Placement

__all__ = ["TrainConfig", "add_train_arguments", "read_config_file", "train_config_from_args"]

PlanMode = Literal["fixed", "auto"]
Exchange = Literal["flat", "2dh"]
Reroute = Literal["auto", "on", "shadow", "off"]

MAX_WORKERS = 256  # local processes on one machine; more is a typo, not a plan
_REROUTES: dict[str, bool | Literal["shadow"] | None] = {
    "auto": None,
    "on": True,
    "shadow": "shadow",
    "off": False,
}


def _meta(help: str, *, kind: str = "int", choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """A field's ``--help`` line and argparse kind: ``int``, ``float``, ``path``, ``choice`` or ``flag``."""
    return {"help": help, "kind": kind, "choices": choices}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of one ``flexmoe train`` run (validated on construction).

    Runtime facts (the rank, the world size under ``torchrun``) are not fields: they
    are arguments of the functions that need them.
    """

    steps: int = field(default=400, metadata=_meta("training steps (optimizer updates), >= 1"))
    batch_size: int = field(default=16, metadata=_meta("sequences per worker per step, >= 1"))
    context: int = field(default=128, metadata=_meta("bytes per sequence, >= 1"))
    dim: int = field(default=128, metadata=_meta("model width, a multiple of --heads"))
    layers: int = field(default=2, metadata=_meta("attention + MoE blocks, >= 1"))
    heads: int = field(default=4, metadata=_meta("attention heads, >= 1"))
    experts: int = field(default=8, metadata=_meta("experts per MoE layer, >= --top-k"))
    top_k: int = field(default=2, metadata=_meta("experts each token is routed to, in [1, --experts]"))
    top_p: float | None = field(
        default=None,
        metadata=_meta(
            "top-p routing: each token takes the fewest of its --top-k best experts whose "
            "probabilities reach this, in (0, 1] (none: always --top-k)",
            kind="float",
        ),
    )
    min_k: int = field(
        default=1, metadata=_meta("the fewest experts a token takes under --top-p, in [1, --top-k]")
    )
    zero_experts: str | None = field(
        default=None,
        metadata=_meta(
            "zero-computation experts the routers also choose among, comma-separated: skip, copy, "
            "constant (e.g. skip,copy,constant) (none: no zero experts)",
            kind="text",
        ),
    )
    layer_top_k: str | None = field(
        default=None,
        metadata=_meta(
            "per-layer top-k, comma-separated, each a number or a schedule over steps "
            "(2->1@300: a step change, 2->1@0..300: linear), in [--min-k, --experts] (none: --top-k)",
            kind="text",
        ),
    )
    layer_top_p: str | None = field(
        default=None,
        metadata=_meta("per-layer top-p, as --layer-top-k, in (0, 1] (none: --top-p)", kind="text"),
    )
    layer_capacity_factor: str | None = field(
        default=None,
        metadata=_meta("per-layer capacity factor, as --layer-top-k (none: --capacity-factor)", kind="text"),
    )
    target_experts: float | None = field(
        default=None,
        metadata=_meta(
            "hold each layer's mean experts per token at this by moving its top-p after every step "
            "(starts from --top-p; see --target-rate) (none: no controller)",
            kind="float",
        ),
    )
    target_rate: float = field(
        default=0.02,
        metadata=_meta(
            "the controller's gain: p += rate * (target - measured experts per token), > 0", kind="float"
        ),
    )
    expert_hidden: int = field(default=256, metadata=_meta("hidden width of each expert, >= 1"))
    capacity_factor: float = field(
        default=0.0, metadata=_meta(">0: fixed capacity, <0: adaptive cap, 0: dropless", kind="float")
    )
    load_balance_weight: float = field(
        default=0.01, metadata=_meta("weight of the load-balancing loss, >= 0", kind="float")
    )
    lr: float = field(default=3e-3, metadata=_meta("peak learning rate (AdamW), > 0", kind="float"))
    warmup: int = field(
        default=20, metadata=_meta("linear learning-rate warm-up steps, >= 0 (then cosine to 10%)")
    )
    seed: int = field(
        default=0, metadata=_meta("seed of the initial weights, the data order and every random draw, >= 0")
    )
    log_every: int = field(default=25, metadata=_meta("steps between log lines and metrics records, >= 1"))
    eval_every: int = field(default=100, metadata=_meta("steps between evaluations, >= 1"))
    eval_batches: int = field(default=4, metadata=_meta("validation batches per evaluation, >= 1"))
    checkpoint_every: int = field(
        default=0, metadata=_meta("steps between checkpoints, >= 0 (0: only at the end)")
    )
    keep_checkpoints: int = field(
        default=2, metadata=_meta("newest checkpoints kept in RUN_DIR/checkpoints, >= 1")
    )
    run_dir: Path | None = field(
        default=None, metadata=_meta("run directory (none: runs/train-<time>)", kind="path")
    )
    resume: Path | None = field(
        default=None,
        metadata=_meta(
            "continue exactly from a run (or checkpoint) directory's newest checkpoint", kind="path"
        ),
    )
    trace: Path | None = field(
        default=None,
        metadata=_meta(
            "record the routing (per-layer per-step expert counts) to this .jsonl or .jsonl.gz file; "
            "a relative path is inside the run directory",
            kind="path",
        ),
    )
    tensorboard: Path | None = field(
        default=None,
        metadata=_meta(
            "also write the metrics as TensorBoard events into this directory (needs the tensorboard extra)",
            kind="path",
        ),
    )
    no_progress: bool = field(default=False, metadata=_meta("no progress bar", kind="flag"))
    workers: int = field(
        default=1,
        metadata=_meta(
            f"local worker processes (expert + data parallel) in [1, {MAX_WORKERS}]; 1: no launch"
        ),
    )
    plan: PlanMode = field(
        default="fixed",
        metadata=_meta(
            "fixed: the plan of --plan-r/--plan-d/--exchange/--reroute; auto: the online tuner picks it",
            kind="choice",
            choices=get_args(PlanMode),
        ),
    )
    plan_r: int | None = field(
        default=None, metadata=_meta("plan sharing degree r, >= 0 (none: the layer's default)")
    )
    plan_d: int = field(default=1, metadata=_meta("plan pipelining degree d, >= 1"))
    exchange: Exchange = field(
        default="flat", metadata=_meta("all-to-all algorithm", kind="choice", choices=get_args(Exchange))
    )
    reroute: Reroute = field(
        default="auto",
        metadata=_meta(
            "rerouting under skew: the cost model decides (auto), least-loaded (on), shadowing, or none",
            kind="choice",
            choices=get_args(Reroute),
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        if self.top_k > self.experts:
            raise OptionError("top_k", f"must be <= --experts ({self.experts}), got {self.top_k}")
        if self.min_k > self.top_k:
            raise OptionError("min_k", f"must be <= --top-k ({self.top_k}), got {self.min_k}")
        check_routing_options(self)
        if self.dim % self.heads != 0:
            raise OptionError("heads", f"must divide --dim ({self.dim}), got {self.heads}")
        if self.workers > 1:
            self.check_world(self.workers)

    def check_world(self, world: int) -> None:
        """Refuse (``OptionError``) experts or a plan that cannot be spread over ``world`` ranks."""
        try:
            placement = Placement(
                world_size=world,
                rank=0,
                num_experts=self.experts,
                hidden_dim=self.expert_hidden,
                ranks_per_node=world,
            )
        except ValueError as error:
            reason = f"cannot be spread over {world} workers: {error}"
            raise OptionError("experts", reason) from None
        plan = self.layer_plan(world)
        if isinstance(plan, Plan):
            try:
                placement.resolve(plan)
            except ValueError as error:
                raise OptionError("plan_r", f"gives no valid plan on {world} workers: {error}") from None

    def layer_plan(self, world: int) -> Plan | str | None:
        """The MoE layers' plan on ``world`` ranks: none on one, ``"auto"`` or the fixed plan."""
        if world == 1:
            return None
        if self.plan == "auto":
            return "auto"
        return Plan(r=self.plan_r, d=self.plan_d, exchange=self.exchange, reroute=_REROUTES[self.reroute])

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (paths as text): what ``config.json`` and checkpoints record."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def to_argv(self) -> list[str]:
        """Flags that rebuild exactly this config (``train_config_from_args`` of them equals ``self``)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] == "flag":
                argv += [option_flag(f.name)] if value else []
            elif value is not None:
                # --flag=value: a value such as -1e-05 would read as an option on its own
                argv.append(
                    f"{option_flag(f.name)}={value!r}"
                    if isinstance(value, float)
                    else f"{option_flag(f.name)}={value}"
                )
        return argv


_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "warmup": (0, None),
    "seed": (0, 2**63 - 1),
    "checkpoint_every": (0, None),
    "workers": (1, MAX_WORKERS),
    "plan_r": (0, None),
}


def _checked(f: dataclasses.Field[Any], value: object) -> object:
    """``value`` of field ``f``, checked and normalised (an int float becomes a float, text a path)."""
    kind = f.metadata["kind"]
    if value is None and f.default is None:
        return None
    if kind == "float":
        if f.name == "top_p":
            number = check_float(f.name, value, positive=True)
            if number > 1:
                raise OptionError(f.name, f"must be a finite number in (0, 1], got {value!r}")
            return number
        if f.name in ("lr", "target_rate"):
            return check_float(f.name, value, positive=True)
        if f.name == "target_experts":
            return check_float(f.name, value, minimum=0.0)
        if f.name == "load_balance_weight":
            return check_float(f.name, value, minimum=0.0)
        return check_float(f.name, value)
    if kind == "path":
        return check_optional_path(f.name, value)
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise OptionError(f.name, f"must be non-empty text, got {value!r}")
        return value
    if kind == "flag":
        return check_bool(f.name, value)
    if kind == "choice":
        return check_choice(f.name, value, f.metadata["choices"])
    minimum, maximum = _INT_RANGES.get(f.name, (1, None))
    return check_int(f.name, value, minimum=minimum, maximum=maximum)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser, *, steps: int = 400) -> None:
    """Register one option per ``TrainConfig`` field, plus ``--config``; ``--help`` shows every default.

    The options have no argparse defaults (``SUPPRESS``), so that ``train_config_from_args``
    knows which ones the command line gave: those win over the ``--config`` file.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML or JSON file of option values; the command line wins (default: none)",
    )
    defaults = {**_field_defaults(), "steps": steps}
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{f.metadata['help']} (default: {describe_default(defaults[f.name])})".replace("%", "%%")
        kind = f.metadata["kind"]
        flag = option_flag(f.name)
        if kind == "flag":
            parser.add_argument(
                flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "choice":
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = {"int": _parse_int, "float": _parse_float, "path": Path, "text": str}[kind]
            kwargs["metavar"] = {"int": "N", "float": "X", "path": "PATH", "text": "TEXT"}[kind]
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(train_defaults=defaults)


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: Path) -> dict[str, tuple[str, object]]:
    """``{field: (key as written, value)}`` from a TOML (``.toml``) or JSON file; ``CliError`` if unusable.

    Unknown keys are refused (with the closest option name), and so is a value of the
    wrong type or range (the cross-field rules are checked by ``TrainConfig``).
    """
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as error:  # UnicodeDecodeError and parse errors are ValueErrors
        reason = " ".join(str(error).split())
        raise CliError(f"argument --config: cannot read {path} ({reason})") from None
    if not isinstance(values, dict):
        raise CliError(f"argument --config: {path} must hold a table of options, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, tuple[str, object]] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise CliError(f"--config {path}: unknown option {key!r}{hint}")
        try:  # each value on its own, even one the command line overrides: the file is wrong
            _checked(known[name], value)
        except OptionError as error:
            raise CliError(f"--config {path}: {key}: {error.reason}") from None
        out[name] = (key, value)
    return out


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``flexmoe train`` arguments: defaults < ``--config`` < flags.

    A value that fails its check raises ``CliError`` naming the option where it came
    from: ``argument --steps: ...`` or ``--config FILE: steps: ...``.
    """
    defaults: Mapping[str, Any] = args.train_defaults
    given = {name: getattr(args, name) for name in defaults if hasattr(args, name)}
    from_file = read_config_file(args.config) if args.config is not None else {}
    values = {**defaults, **{k: v for k, (_, v) in from_file.items()}, **given}
    try:
        return TrainConfig(**values)
    except OptionError as error:
        if error.option in from_file and error.option not in given:
            raise CliError(f"--config {args.config}: {from_file[error.option][0]}: {error.reason}") from None
        raise CliError(f"argument {option_flag(error.option)}: {error.reason}") from None
