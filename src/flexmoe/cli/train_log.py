"""What ``flexmoe train`` tells people: console lines, a bar, ``metrics.jsonl``, ``config.json``, TensorBoard.

Only rank 0 prints and writes; every rank calls ``RunLog.train_step`` because the
logged losses are means over workers. Each rank keeps its own per-step losses, and
every ``log_every`` steps (and at the last) one collective reduces them all as one
vector, so the log costs no collective per step.

A ``metrics.jsonl`` line is an evaluation (``step``, ``eval_loss``) or a logged step:
``step``, ``loss``, ``aux_loss``, ``grad_norm``, ``lr`` (of that step), ``tokens_per_s``
(since the previous logged step), ``time_s``, a snapshot of each MoE layer's statistics
(``layers``) and ``per_step``: every step since the previous logged step, as columns
(``step``, ``loss``, ``aux_loss``, ``lr``, ``grad_norm``, and per layer ``plan``,
``tuner``, ``dropped``, ``rerouted_rows``, ``expert_copies``, ``experts_per_token``
(the mean routed experts per token), ``skip_rate`` (the share of the tokens' choices
that went to zero-computation experts) and ``top_p`` (``null`` without top-p)). A
layer's snapshot also holds ``experts_per_token_hist`` (tokens that used 0, 1, ...,
``top_k`` routed experts in the step). Older runs have no ``per_step``, ``aux_loss``
or ``grad_norm``; ``flexmoe report`` reads both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from flexmoe.cli.train_config import TrainConfig
from flexmoe.cli.train_tensorboard import TensorBoardLog
from flexmoe.config import Plan
from flexmoe.layer import MoEStats
from flexmoe.parallel import all_reduce_sum_

__all__ = ["RunLog", "StepResult", "plan_text", "skip_rate"]


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one training step leaves for the log: its losses, gradient norm and the MoE layers' statistics."""

    loss: Tensor  # this rank's cross-entropy (a scalar, detached)
    aux_loss: Tensor  # the MoE layers' auxiliary losses on this rank (a scalar, detached)
    lr: float  # the learning rate the step used
    grad_norm: float  # the whole model's gradient norm before clipping (equal on every rank)
    layers: list[MoEStats]  # per MoE layer, in depth order
    top_p: list[float | None] = field(default_factory=list)  # per MoE layer: its top-p (None: off)


@dataclass
class _Window:
    """The steps since the last logged one: this rank's losses, and what every rank agrees on."""

    steps: list[int]
    losses: list[float]  # this rank's: reduced over the workers when the window is logged
    aux_losses: list[float]  # this rank's, as the losses
    lrs: list[float]
    grad_norms: list[float]
    layers: list[dict[str, list[Any]]]  # per MoE layer: plan, tuner, dropped, rerouted rows, copies

    @staticmethod
    def empty() -> _Window:
        return _Window(steps=[], losses=[], aux_losses=[], lrs=[], grad_norms=[], layers=[])

    def add(self, step: int, loss: float, aux_loss: float, result: StepResult) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.aux_losses.append(aux_loss)
        self.lrs.append(result.lr)
        self.grad_norms.append(result.grad_norm)
        if not self.layers:
            self.layers = [{name: [] for name in _LAYER_COLUMNS} for _ in result.layers]
        top_p = result.top_p or [None] * len(result.layers)
        for columns, stats, p in zip(self.layers, result.layers, top_p, strict=True):
            columns["experts_per_token"].append(stats.mean_experts_per_token)
            columns["skip_rate"].append(skip_rate(stats))
            columns["top_p"].append(p)
            columns["plan"].append(plan_text(stats.plan))
            columns["tuner"].append(stats.tuner.phase if stats.tuner is not None else None)
            columns["dropped"].append(stats.dropped)
            columns["rerouted_rows"].append(stats.rerouted_rows)
            columns["expert_copies"].append(stats.expert_copies)


_LAYER_COLUMNS = (
    "plan",
    "tuner",
    "dropped",
    "rerouted_rows",
    "expert_copies",
    "experts_per_token",
    "skip_rate",
    "top_p",
)


def _mean_over_workers(rows: list[list[float]], world: int) -> list[list[float]]:
    """Each row's element-wise mean over the workers: one collective for all of them (every rank calls it)."""
    if world == 1:
        return rows
    table = torch.tensor(rows, dtype=torch.float64)
    all_reduce_sum_([table])
    return (table / world).tolist()


class _Progress:
    """A tqdm bar when wanted and available (and stderr is a terminal); nothing otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - the train extra installs it
                return
            # disable=None: no bar when stderr is not a terminal (logs stay clean).
            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False, disable=None
            )

    def update(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(line, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunLog:
    """The run's console output and ``metrics.jsonl`` (appended to, so a resumed run continues it)."""

    def __init__(self, config: TrainConfig, run_dir: Path, rank: int, world: int, done_steps: int) -> None:
        self.config = config
        self.rank = rank
        self.tokens_per_step = config.batch_size * config.context * world
        self.world = world
        self.metrics: IO[str] | None = None
        self.tensorboard: TensorBoardLog | None = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            settings = {**config.to_json(), "world_size": world}
            (run_dir / "config.json").write_text(json.dumps(settings, indent=1))
            self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if config.tensorboard is not None:
                self.tensorboard = TensorBoardLog(config.tensorboard)
        self.progress = _Progress(config.steps, done_steps, enabled=rank == 0 and not config.no_progress)
        self.start = time.perf_counter()
        self.window_start, self.window_tokens = self.start, 0
        self.step_start = self.start
        self.window = _Window.empty()

    def say(self, line: str) -> None:
        """Print ``line`` on rank 0 (above the progress bar)."""
        if self.rank == 0:
            self.progress.write(line)

    def record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0) and flush it; its scalars to TensorBoard."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def evaluation(self, step: int, loss: float) -> None:
        """An evaluation loss after ``step`` steps."""
        self.record({"step": step, "eval_loss": loss})

    def train_step(self, step: int, result: StepResult) -> None:
        """Advance the bar and keep the step's scalars; every ``log_every`` steps (and the last), log them."""
        self.window_tokens += self.tokens_per_step
        tick = time.perf_counter()
        # NOTE: a host sync per step, one for both numbers (the bar shows the loss)
        loss, aux_loss = torch.stack([result.loss, result.aux_loss]).tolist()
        self.window.add(step, loss, aux_loss, result)
        worst = max(s.load_max_over_mean for s in result.layers)
        self.progress.update(
            {
                "loss": f"{loss:.3f}",
                "tok/s": f"{self.tokens_per_step / max(tick - self.step_start, 1e-9):.0f}",
                "load": f"{worst:.2f}",
                "plan": plan_text(result.layers[-1].plan),
            }
        )
        self.step_start = tick
        if step % self.config.log_every != 0 and step != self.config.steps:
            return
        self._log_window(step, tick, result)

    def _log_window(self, step: int, tick: float, result: StepResult) -> None:
        """The console line and the metrics record of the window ending at ``step`` (a collective)."""
        window = self.window
        losses, aux_losses = _mean_over_workers([window.losses, window.aux_losses], self.world)
        rate = self.window_tokens / max(tick - self.window_start, 1e-9)
        loads = " ".join(f"{s.load_max_over_mean:.2f}" for s in result.layers)
        dropped = sum(s.dropped for s in result.layers)
        self.say(
            f"step {step:5d}  loss {losses[-1]:.3f}  aux {aux_losses[-1]:.4f}  grad norm "
            f"{result.grad_norm:.3f}  {rate:8.0f} tok/s  load max/mean per layer [{loads}]  dropped {dropped}"
        )
        self.record(
            {
                "step": step,
                "loss": losses[-1],
                "aux_loss": aux_losses[-1],
                "grad_norm": result.grad_norm,
                "tokens_per_s": rate,
                "lr": result.lr,
                "time_s": tick - self.start,
                "layers": [
                    {**_layer_record(s), "top_p": p}
                    for s, p in zip(result.layers, result.top_p or [None] * len(result.layers), strict=True)
                ],
                "per_step": {
                    "step": window.steps,
                    "loss": losses,
                    "aux_loss": aux_losses,
                    "lr": window.lrs,
                    "grad_norm": window.grad_norms,
                    "layers": window.layers,
                },
            }
        )
        self.window_start, self.window_tokens = tick, 0
        self.window = _Window.empty()

    def close(self) -> None:
        """Close the bar, the metrics file and the TensorBoard events (safe to call twice)."""
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _layer_record(stats: MoEStats) -> dict[str, Any]:
    return {
        "routed": stats.routed_per_expert.tolist(),
        "dropped": stats.dropped,
        "assignments": int(stats.routed_per_expert.sum()),
        "experts_per_token": stats.mean_experts_per_token,
        "experts_per_token_hist": None
        if stats.experts_per_token is None
        else stats.experts_per_token.tolist(),
        "skip_rate": skip_rate(stats),
        "load_max_over_mean": stats.load_max_over_mean,
        "plan": plan_text(stats.plan),
        "tuner": stats.tuner.phase if stats.tuner is not None else None,
        "rerouted_rows": stats.rerouted_rows,
        "expert_copies": stats.expert_copies,
        "replica_hits": stats.replica_hits,
        "shadowed_experts": len(stats.shadowed_experts),
        "capacity": stats.capacity,
        "top_k": stats.top_k,
    }


def skip_rate(stats: MoEStats) -> float:
    """The share of the call's choices that went to zero-computation experts (0.0 without them)."""
    zero = 0 if stats.zero_expert_choices is None else int(stats.zero_expert_choices.sum())
    routed = int(stats.routed_per_expert.sum())
    return zero / (zero + routed) if zero + routed else 0.0


def plan_text(plan: Plan) -> str:
    """A plan as the log shows it: ``r=1,d=2,2dh,reroute``."""
    parts = [] if plan.r is None else [f"r={plan.r}"]
    parts += [f"d={plan.d}", plan.exchange]
    if plan.reroute:
        parts.append("shadow" if plan.reroute == "shadow" else "reroute")
    return ",".join(parts)
