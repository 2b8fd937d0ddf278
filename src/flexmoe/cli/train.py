"""``flexmoe train``: train a small MoE byte-level language model on real offline text.

The corpus is the Python standard library's own source files (every machine with
Python has them). The run directory collects what people want to look at afterwards:
``config.json`` (every setting), ``metrics.jsonl`` (loss, tokens/s, per-layer
per-expert loads, drops and plans over time), ``checkpoints/`` (atomic, re-shardable;
see ``flexmoe.checkpoint``), ``summary.json`` and, with ``--trace PATH``, a routing
trace of every training step (``flexmoe.planner.trace``); ``flexmoe report RUN_DIR`` renders it.

``--workers N`` trains on ``N`` local processes (gloo on CPU, NCCL on GPUs) launched
with ``torchrun``: the MoE layers' experts are spread over the workers (expert
parallelism with the plan given by ``--plan-r/--plan-d/--exchange/--reroute``), the
other parameters are data-parallel (DDP), and every worker reads its own batches.
Running under ``torchrun`` directly does the same. Every option can also come from a
JSON or TOML file (``--config FILE``; keys are the option names, ``-`` or ``_``);
options given on the command line win.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from flexmoe.checkpoint import load_checkpoint, save_checkpoint
from flexmoe.config import Plan
from flexmoe.models import TinyMoELM, TinyMoELMConfig, stdlib_corpus
from flexmoe.parallel import (
    all_reduce_mean,
    clip_grad_norm_,
    init_distributed,
    scale_expert_gradients,
    shutdown,
    wrap_data_parallel,
)
from flexmoe.tools.recorder import RoutingRecorder

__all__ = ["add_train_arguments", "config_file_defaults", "evaluate", "run_train"]

_PATH_OPTIONS = ("run_dir", "resume", "trace")
_POSITIVE = ("steps", "batch_size", "context", "log_every", "workers", "plan_d", "eval_every", "eval_batches")


def add_train_arguments(parser: argparse.ArgumentParser, *, steps: int = 400) -> None:
    """Register the options of ``flexmoe train``."""
    parser.add_argument("--config", type=Path, default=None, help="JSON or TOML file of option defaults")
    parser.add_argument("--steps", type=int, default=steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per worker per step")
    parser.add_argument("--context", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument(
        "--capacity-factor", type=float, default=0.0, help=">0 fixed, <0 adaptive cap, 0 dropless"
    )
    parser.add_argument("--load-balance-weight", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/train-<time>")
    parser.add_argument("--resume", type=Path, default=None, help="a run (or checkpoint) directory")
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="record the routing (per-layer per-step expert counts) to this .jsonl or .jsonl.gz file; "
        "a relative path is inside the run directory",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--workers", type=int, default=1, help="local worker processes (expert + data parallel); 1: no launch"
    )
    parser.add_argument(
        "--plan",
        choices=["fixed", "auto"],
        default="fixed",
        help="fixed: the plan of --plan-r/--plan-d/--exchange/--reroute; auto: the online tuner picks it",
    )
    parser.add_argument("--plan-r", type=int, default=None, help="plan sharing degree r (default: layer's)")
    parser.add_argument("--plan-d", type=int, default=1, help="plan pipelining degree d")
    parser.add_argument("--exchange", choices=["flat", "2dh"], default="flat", help="all-to-all algorithm")
    parser.add_argument(
        "--reroute",
        choices=["auto", "on", "shadow", "off"],
        default="auto",
        help="rerouting under skew: the cost model decides (auto), least-loaded (on), shadowing, or none",
    )


def config_file_defaults(parser: argparse.ArgumentParser, path: Path | None) -> dict[str, Any]:
    """The options in ``path`` (JSON or TOML), checked against ``parser``'s, as defaults."""
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--config {path}: cannot read it ({error})") from error
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a table of options, got {type(values).__name__}")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise SystemExit(f"--config {path}: unknown option {key!r}")
        defaults[dest] = Path(value) if dest in _PATH_OPTIONS and value is not None else value
    return defaults


def _launch_workers(args: argparse.Namespace) -> None:
    """Re-run this command on ``--workers`` local processes under ``torchrun``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.workers}",
        "-m",
        "flexmoe.cli",
        *sys.argv[1:],
    ]
    if args.run_dir is None:  # every worker must write the same run directory
        command += ["--run-dir", str(args.resolved_run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"flexmoe train: a worker failed (exit code {result.returncode})")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, corpus: object, batch_size: int, context: int, batches: int, rank: int, world: int
) -> float:
    """Mean validation loss over ``batches`` fixed batches, shared out over the ranks.

    Batch ``b`` is always the same windows (seeded by ``b``), and rank ``r`` evaluates
    the batches ``b = r, r + W, ...``, so the result does not depend on the number of
    workers (when ``W`` divides ``batches``) — a checkpoint evaluates the same anywhere.
    """
    model.eval()
    losses = []
    for b in range(rank, max(batches, world), world):  # every rank runs >= 1 batch (collectives)
        generator = torch.Generator().manual_seed(1234 + b % batches)
        x, y = corpus.batch("val", batch_size, context, generator)  # type: ignore[attr-defined]
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses))


def run_train(args: argparse.Namespace) -> None:
    """Train, log, evaluate, checkpoint; then print and store a summary."""
    for name in _POSITIVE:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoint_every < 0:
        raise SystemExit(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.resolved_run_dir = args.run_dir or Path("runs") / f"train-{stamp}"
    if args.workers > 1 and "LOCAL_RANK" not in os.environ:
        _launch_workers(args)
        return
    rank, world = init_distributed()
    try:
        _train(args, rank, world)
    finally:
        shutdown()


class _Progress:
    """A tqdm bar on rank 0 when wanted and available; plain log lines always."""

    def __init__(self, total: int, initial: int, rank: int, enabled: bool) -> None:
        self.bar: Any = None
        self.rank = rank
        if enabled and rank == 0:
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
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.clear()
        print(line, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train(args: argparse.Namespace, rank: int, world: int) -> None:
    run_dir: Path = args.resolved_run_dir
    # Non-expert parameters start equal on every rank (DDP and the layers broadcast
    # rank 0's anyway); expert parameters differ per rank: each rank holds other experts.
    torch.manual_seed(args.seed + rank)
    corpus = stdlib_corpus()
    reroutes: dict[str, bool | Literal["shadow"] | None] = {
        "auto": None,
        "on": True,
        "shadow": "shadow",
        "off": False,
    }
    reroute = reroutes[args.reroute]
    config = TinyMoELMConfig(
        context=args.context,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden_dim=args.expert_hidden,
        capacity_factor=args.capacity_factor,
        load_balance_weight=args.load_balance_weight,
        plan=None
        if world == 1
        else "auto"
        if args.plan == "auto"
        else Plan(r=args.plan_r, d=args.plan_d, exchange=args.exchange, reroute=reroute),
    )
    model = TinyMoELM(config)
    trained = wrap_data_parallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / max(1, args.warmup))
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        ),
    )
    first_step = 1
    if args.resume is not None:
        resume = args.resume / "checkpoints" if (args.resume / "checkpoints").is_dir() else args.resume
        manifest = load_checkpoint(resume, model, optimizer)
        first_step = int(manifest["step"]) + 1
        with warnings.catch_warnings():  # fast-forward the schedule; no optimizer step is skipped
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(first_step - 1):
                schedule.step()
    generator = torch.Generator().manual_seed(args.seed + 1000 * rank + first_step)
    say = print if rank == 0 else (lambda *_, **__: None)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**settings, "world_size": world}, indent=1))
    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    params = sum(p.numel() for p in model.parameters())
    say(
        f"flexmoe train: {len(corpus.train) / 1e6:.1f} MB of training bytes from {corpus.source}\n"
        f"model: {config.num_layers} layers, dim {config.dim}, "
        f"{config.num_experts} experts top-{config.top_k}, "
        f"{params / 1e6:.2f}M parameters on rank 0; batch {args.batch_size}x{args.context} tokens per "
        f"worker, {world} worker(s), {args.steps} steps; run directory {run_dir}"
    )
    if world > 1:
        layer = model.moe_layers()[0]
        assert layer._ep is not None and config.plan is not None
        plan_text = (
            "auto (the online tuner)"
            if isinstance(config.plan, str)
            else str(layer._ep.placement.resolve(config.plan))
        )
        say(
            f"expert parallel: {config.num_experts} experts over {world} workers "
            f"({layer.experts.num_experts} per worker), plan {plan_text}"
        )
    if first_step > 1:
        say(f"resumed from {args.resume} at step {first_step - 1}")
    recorder = None
    if args.trace is not None:
        # Train steps are numbered from 1; a resumed run replaces what the trace holds
        # from its first step on (a crashed run may have recorded past its checkpoint).
        trace_path = args.trace if args.trace.is_absolute() else run_dir / args.trace
        meta = {"command": "flexmoe train", "batch_size": args.batch_size, "context": args.context}
        recorder = RoutingRecorder(
            model, trace_path, start_step=first_step, meta=meta, rank=rank, world_size=world
        )
        say(f"recording the routing of every step to {trace_path}")
    initial = evaluate(trained, corpus, args.batch_size, args.context, args.eval_batches, rank, world)
    say(f"initial eval loss {initial:.3f} (uniform over bytes would be {math.log(256):.3f})")
    if metrics is not None:
        metrics.write(json.dumps({"step": first_step - 1, "eval_loss": initial}) + "\n")
    tokens_per_step = args.batch_size * args.context * world
    progress = _Progress(args.steps, first_step - 1, rank, not args.no_progress)
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    step = first_step - 1
    final = initial
    step_start = start
    for step in range(first_step, args.steps + 1):
        x, y = corpus.batch("train", args.batch_size, args.context, generator)
        logits = trained(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (loss + model.aux_loss()).backward()
        scale_expert_gradients(model)  # DDP averages the other gradients over workers
        clip_grad_norm_(model, 1.0)  # the global norm: equal on every worker
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if recorder is not None:
            recorder.step(step)  # one record per MoE layer (eval forwards are not recorded)
        window_tokens += tokens_per_step
        layers = [layer.stats for layer in model.moe_layers() if layer.stats is not None]
        worst = max(s.load_max_over_mean for s in layers)
        tick = time.perf_counter()
        postfix = {
            "loss": f"{loss.item():.3f}",
            "tok/s": f"{tokens_per_step / (tick - step_start):.0f}",
            "load": f"{worst:.2f}",
            "plan": _plan_text(layers[-1].plan),
        }
        progress.update(postfix)
        step_start = tick
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            mean_loss = all_reduce_mean(loss.item())  # a collective: every worker runs it
            rate = window_tokens / (now - window_start)
            loads = " ".join(f"{s.load_max_over_mean:.2f}" for s in layers)
            dropped = sum(s.dropped for s in layers)
            progress.write(
                f"step {step:5d}  loss {mean_loss:.3f}  aux {model.aux_loss().item():.4f}  "
                f"{rate:8.0f} tok/s  load max/mean per layer [{loads}]  dropped {dropped}"
            )
            if metrics is not None:
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "tokens_per_s": rate,
                    "lr": schedule.get_last_lr()[0],
                    "time_s": now - start,
                    "layers": [
                        {
                            "routed": s.routed_per_expert.tolist(),
                            "dropped": s.dropped,
                            "assignments": s.num_tokens * s.top_k,
                            "load_max_over_mean": s.load_max_over_mean,
                            "plan": _plan_text(s.plan),
                            "tuner": s.tuner.phase if s.tuner is not None else None,
                            "rerouted_rows": s.rerouted_rows,
                        }
                        for s in layers
                    ],
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            window_start, window_tokens = now, 0
        if step % args.eval_every == 0 and step != args.steps:
            final = evaluate(trained, corpus, args.batch_size, args.context, args.eval_batches, rank, world)
            progress.write(f"step {step:5d}  eval loss {final:.3f}")
            if metrics is not None:
                metrics.write(json.dumps({"step": step, "eval_loss": final}) + "\n")
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step != args.steps:
            save_checkpoint(
                run_dir / "checkpoints", model, optimizer, step=step, extra={"settings": settings}
            )
    progress.close()
    if recorder is not None:
        recorder.close()
    elapsed = time.perf_counter() - start
    steps_run = max(0, args.steps - first_step + 1)
    final = evaluate(trained, corpus, args.batch_size, args.context, args.eval_batches, rank, world)
    if metrics is not None:
        metrics.write(json.dumps({"step": step, "eval_loss": final}) + "\n")
        metrics.close()
    checkpoint = save_checkpoint(
        run_dir / "checkpoints", model, optimizer, step=step, extra={"settings": settings}
    )
    last = model.moe_layers()[-1].stats
    tokens = steps_run * tokens_per_step
    summary = {
        "steps": steps_run,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "world_size": world,
        "checkpoint": str(checkpoint),
        "expert_backend": last.backend if last else None,
        "trace": None if recorder is None else str(recorder.path),
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    say(
        f"done: {steps_run} steps, {tokens} tokens in {elapsed:.1f} s "
        f"({summary['tokens_per_s']:.0f} tok/s); eval loss {initial:.3f} -> {final:.3f}; "
        f"expert backend {summary['expert_backend']}; checkpoint {checkpoint}; "
        f"see `flexmoe report {run_dir}`"
    )


def _plan_text(plan: Plan) -> str:
    parts = [] if plan.r is None else [f"r={plan.r}"]
    parts += [f"d={plan.d}", plan.exchange]
    if plan.reroute:
        parts.append("shadow" if plan.reroute == "shadow" else "reroute")
    return ",".join(parts)
