"""What ``flexmoe train`` tells people: console lines, a progress bar, ``metrics.jsonl`` and ``config.json``.

Only rank 0 prints and writes; every rank calls ``RunLog.train_step`` because the
logged loss is a mean over workers (a collective every ``log_every`` steps).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from torch import Tensor

from flexmoe.cli.train_config import TrainConfig
from flexmoe.config import Plan
from flexmoe.layer import MoEStats
from flexmoe.parallel import all_reduce_mean

__all__ = ["RunLog", "StepResult", "plan_text"]


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one training step leaves for the log: its loss and the MoE layers' statistics."""

    loss: Tensor  # this rank's cross-entropy (a scalar, detached)
    aux_loss: Tensor  # the MoE layers' auxiliary losses (a scalar, detached)
    lr: float  # the learning rate the step used
    layers: list[MoEStats]  # per MoE layer, in depth order


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
        self.metrics: IO[str] | None = None
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            settings = {**config.to_json(), "world_size": world}
            (run_dir / "config.json").write_text(json.dumps(settings, indent=1))
            self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.progress = _Progress(config.steps, done_steps, enabled=rank == 0 and not config.no_progress)
        self.start = time.perf_counter()
        self.window_start, self.window_tokens = self.start, 0
        self.step_start = self.start

    def say(self, line: str) -> None:
        """Print ``line`` on rank 0 (above the progress bar)."""
        if self.rank == 0:
            self.progress.write(line)

    def record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0) and flush it."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def evaluation(self, step: int, loss: float) -> None:
        """An evaluation loss after ``step`` steps."""
        self.record({"step": step, "eval_loss": loss})

    def train_step(self, step: int, result: StepResult) -> None:
        """Advance the bar; every ``log_every`` steps (and the last), a line and a metrics record."""
        self.window_tokens += self.tokens_per_step
        tick = time.perf_counter()
        loss = result.loss.item()  # NOTE: a host sync per step (the bar shows the loss)
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
        mean_loss = all_reduce_mean(loss)  # a collective: every worker runs it
        rate = self.window_tokens / max(tick - self.window_start, 1e-9)
        loads = " ".join(f"{s.load_max_over_mean:.2f}" for s in result.layers)
        dropped = sum(s.dropped for s in result.layers)
        self.say(
            f"step {step:5d}  loss {mean_loss:.3f}  aux {result.aux_loss.item():.4f}  "
            f"{rate:8.0f} tok/s  load max/mean per layer [{loads}]  dropped {dropped}"
        )
        self.record(
            {
                "step": step,
                "loss": mean_loss,
                "tokens_per_s": rate,
                "lr": result.lr,
                "time_s": tick - self.start,
                "layers": [_layer_record(s) for s in result.layers],
            }
        )
        self.window_start, self.window_tokens = tick, 0

    def close(self) -> None:
        """Close the bar and the metrics file."""
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def _layer_record(stats: MoEStats) -> dict[str, Any]:
    return {
        "routed": stats.routed_per_expert.tolist(),
        "dropped": stats.dropped,
        "assignments": stats.num_tokens * stats.top_k,
        "load_max_over_mean": stats.load_max_over_mean,
        "plan": plan_text(stats.plan),
        "tuner": stats.tuner.phase if stats.tuner is not None else None,
        "rerouted_rows": stats.rerouted_rows,
    }


def plan_text(plan: Plan) -> str:
    """A plan as the log shows it: ``r=1,d=2,2dh,reroute``."""
    parts = [] if plan.r is None else [f"r={plan.r}"]
    parts += [f"d={plan.d}", plan.exchange]
    if plan.reroute:
        parts.append("shadow" if plan.reroute == "shadow" else "reroute")
    return ",".join(parts)
