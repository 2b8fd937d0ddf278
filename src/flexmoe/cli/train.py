"""``flexmoe train``: train a small MoE byte-level language model on real offline text.

The corpus is the Python standard library's own source files (every machine with
Python has them). The run directory collects what people want to look at afterwards:
``config.json`` (every setting), ``metrics.jsonl`` (loss, tokens/s, per-layer
per-expert loads, drops and plans over time), ``checkpoints/`` (atomic, re-shardable;
see ``flexmoe.checkpoint``), ``summary.json`` and, with ``--trace PATH``, a routing
trace of every training step (``flexmoe.planner.trace``); ``flexmoe report RUN_DIR`` renders it.
``--tensorboard DIR`` writes the same scalars as TensorBoard events (``train_tensorboard``).

``--workers N`` trains on ``N`` local processes (gloo on CPU, NCCL on GPUs) launched
with ``torchrun`` and owned by this process (``flexmoe.cli.launch``): the MoE layers'
experts are spread over the workers (expert parallelism with the plan given by
``--plan-r/--plan-d/--exchange/--reroute``), the other parameters are data-parallel
(DDP), and every worker reads its own part of each global batch. Running under
``torchrun`` directly does the same. A run directory has one live run at a time.

Exact resume. Every random draw of a training step comes from generators seeded by
``(seed, step)`` (the data: the global batch, of which rank ``r`` takes its slice) or
``(seed, rank, step)`` (any randomness inside the model), and the learning rate is a
function of the step. So the training state is the weights, the optimizer state and
the step, all in the checkpoint: a run resumed from step ``k`` continues bit-identically
to one never interrupted, on the same worker count with a fixed plan (``--plan auto``
and ``--reroute auto`` choose plans from timings and loads; every plan computes the
same layer, but not always with the same rounding). On another worker count with the
same global batch (``--batch-size`` times workers) the data are the same and the
losses equal up to rounding. The checkpoint records the settings of this contract,
and a resume says which of them changed.

The run is a sequence of small steps: ``build`` (model, optimizer), ``restore``
(``--resume``), ``train_batch`` (data), ``train_step``, ``evaluate``, ``save`` and
the ``RunLog`` (console, ``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexmoe.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from flexmoe.cli.launch import RunLock, check_launcher_alive, guard_worker, launch_workers, run_dir_lock
from flexmoe.cli.options import CliError, OptionError, check_int, one_line, option_flag
from flexmoe.cli.train_adaptive import RoutingControl, zero_experts_of
from flexmoe.cli.train_config import TrainConfig
from flexmoe.cli.train_log import RunLog, StepResult
from flexmoe.cli.train_tensorboard import require_tensorboard
from flexmoe.models import ByteCorpus, TinyMoELM, TinyMoELMConfig, stdlib_corpus
from flexmoe.parallel import (
    all_reduce_mean,
    clip_grad_norm_,
    init_distributed,
    scale_expert_gradients,
    shutdown,
    wrap_data_parallel,
)
from flexmoe.tools.recorder import RoutingRecorder

__all__ = [
    "Trainer",
    "build",
    "build_model",
    "check_resume",
    "evaluate",
    "learning_rate",
    "restore",
    "run_train",
    "save",
    "stream_seed",
    "train",
    "train_batch",
    "train_step",
]

TRAINER_STATE_VERSION = 1
# What a checkpoint records of the run it continues: an exact resume needs them unchanged.
_CONTRACT = (
    "seed",
    "global_batch",
    "context",
    "steps",
    "lr",
    "warmup",
    "capacity_factor",
    "load_balance_weight",
)
_STREAMS = {"data": 0, "model": 1}


def run_train(config: TrainConfig) -> None:
    """Train on this process, launch ``config.workers`` under ``torchrun``, or be one of its workers."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config = dataclasses.replace(config, run_dir=config.run_dir or Path("runs") / f"train-{stamp}")
    run_dir = _run_dir(config)
    load_corpus(config)  # refuse a bad --context or --resume before a directory or a worker exists
    check_resume(config)
    if config.tensorboard is not None:
        require_tensorboard()  # before any worker starts: one line, not one per worker
    if config.workers > 1 and "LOCAL_RANK" not in os.environ:
        lock = RunLock.acquire(run_dir)
        try:
            launch_workers(config.to_argv(), config.workers, lock)
        finally:
            lock.release()
        return
    launched = guard_worker()
    rank, world = init_distributed()
    try:
        with run_dir_lock(run_dir, rank, launched=launched):
            train(config, rank, world)
    finally:
        shutdown()


def _run_dir(config: TrainConfig) -> Path:
    if config.run_dir is None:  # run_train fills it in
        raise ValueError("config.run_dir must be set to train")
    return config.run_dir


@dataclass(frozen=True, kw_only=True)
class Trainer:
    """The live objects of a run on one rank (built by ``build``)."""

    config: TrainConfig
    rank: int
    world: int
    model: TinyMoELM
    trained: nn.Module  # the model as trained: DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    routing: RoutingControl  # layer schedules and the mean-k controller (flexmoe.cli.train_adaptive)


def train(config: TrainConfig, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Build, restore, then train, log, evaluate and checkpoint to ``config.steps``; returns the summary."""
    run_dir = _run_dir(config)
    corpus = load_corpus(config)
    trainer = build(config, rank, world)
    done, notes = restore(trainer)
    log = RunLog(config, run_dir, rank, world, done)
    try:  # the metrics file and the TensorBoard events are flushed and closed, even on an error
        _describe(log, corpus, trainer, done, notes)
        recorder = _routing_recorder(trainer, run_dir, start_step=done + 1, log=log)
        trainer.routing.before_step(done)  # the scheduled routing after `done` steps
        initial = _evaluate(trainer, corpus)
        log.say(f"initial eval loss {initial:.3f} (uniform over bytes would be {math.log(256):.3f})")
        log.evaluation(done, initial)
        for step in range(done + 1, config.steps + 1):
            trainer.routing.before_step(step)
            result = train_step(trainer, *train_batch(corpus, config, step, rank, world), step=step)
            trainer.routing.after_step()
            if recorder is not None:
                recorder.step(step)  # one record per MoE layer (evaluations are not recorded)
            log.train_step(step, result)
            if step % config.eval_every == 0 and step != config.steps:
                loss = _evaluate(trainer, corpus)
                log.say(f"step {step:5d}  eval loss {loss:.3f}")
                log.evaluation(step, loss)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step != config.steps:
                save(trainer, run_dir, step)
        elapsed = time.perf_counter() - log.start
        if recorder is not None:
            recorder.close()
        final = _evaluate(trainer, corpus)
        log.evaluation(config.steps, final)
        checkpoint = save(trainer, run_dir, config.steps)
    finally:
        log.close()
    return _summarise(trainer, run_dir, log, done, elapsed, initial, final, checkpoint, recorder)


@functools.lru_cache(maxsize=1)
def _stdlib_corpus() -> ByteCorpus:
    return stdlib_corpus()  # ~1 s of reading files: once per process


def load_corpus(config: TrainConfig) -> ByteCorpus:
    """The training text; ``CliError`` when ``--context`` does not fit its validation split."""
    corpus = _stdlib_corpus()
    longest = min(len(corpus.train), len(corpus.val)) - 2
    if config.context > longest:
        raise CliError(
            f"argument --context: must be <= {longest} (the validation text's length), got {config.context}"
        )
    return corpus


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of training step ``step`` (from 1): linear warm-up, then cosine to 10 %.

    A pure function of the step, so a resumed run needs no schedule state and no
    fast-forward (O(1) for any step).
    """
    warm = min(1.0, step / max(1, config.warmup))
    progress = min(1.0, (step - 1) / config.steps)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def stream_seed(seed: int, stream: str, *counters: int) -> int:
    """A seed for random stream ``stream`` at ``counters`` (e.g. the step): independent streams, no state."""
    sequence = np.random.SeedSequence([seed, _STREAMS[stream], *counters])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))  # < 2**63


def build(config: TrainConfig, rank: int, world: int) -> Trainer:
    """The model (its MoE layers spread over ``world`` ranks) and its AdamW optimizer."""
    model = build_model(config, rank, world)
    trained = wrap_data_parallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate(config, 1), weight_decay=0.01)
    routing = RoutingControl.from_config(config, model.moe_layers())
    return Trainer(
        config=config,
        rank=rank,
        world=world,
        model=model,
        trained=trained,
        optimizer=optimizer,
        routing=routing,
    )


def build_model(config: TrainConfig, rank: int, world: int) -> TinyMoELM:
    """The model of ``config``, its MoE layers spread over ``world`` ranks (a collective if ``world > 1``)."""
    if world > 1:
        try:
            config.check_world(world)
        except OptionError as error:
            raise CliError(f"argument {option_flag(error.option)}: {error.reason}") from None
    # Non-expert parameters start equal on every rank (DDP and the layers broadcast
    # rank 0's anyway); expert parameters differ per rank: each rank holds other experts.
    torch.manual_seed(config.seed + rank)
    model_config = TinyMoELMConfig(
        context=config.context,
        dim=config.dim,
        num_layers=config.layers,
        num_heads=config.heads,
        num_experts=config.experts,
        top_k=config.top_k,
        top_p=config.top_p,
        min_k=config.min_k,
        zero_experts=zero_experts_of(config.zero_experts),
        expert_hidden_dim=config.expert_hidden,
        capacity_factor=config.capacity_factor,
        load_balance_weight=config.load_balance_weight,
        plan=config.layer_plan(world),
    )
    try:
        return TinyMoELM(model_config)
    except (ValueError, RuntimeError, MemoryError) as error:  # e.g. a model too large for memory
        raise CliError(f"cannot build the model: {one_line(error)}") from None


def _resume_source(config: TrainConfig) -> Path | None:
    """Where ``--resume`` points: a run directory's ``checkpoints/``, or the folder given."""
    if config.resume is None:
        return None
    return config.resume / "checkpoints" if (config.resume / "checkpoints").is_dir() else config.resume


def _refuse_finished(source: Path, done: int, config: TrainConfig) -> None:
    if done >= config.steps:
        raise CliError(
            f"argument --resume: {source} is at step {done}, not before --steps {config.steps}: "
            "nothing to train (raise --steps to continue it)"
        )


def check_resume(config: TrainConfig) -> None:
    """Before any worker starts: ``--resume`` names a checkpoint, and one before ``--steps``.

    Reads only the manifest; whether the tensors fit the model is checked on load.
    """
    source = _resume_source(config)
    if source is None:
        return
    _refuse_finished(source, _saved_step(source), config)


def _saved_step(source: Path) -> int:
    """The step of the newest checkpoint in ``source``, from its manifest (``CliError`` if unreadable)."""
    try:
        manifest = json.loads((latest_checkpoint(source) / "manifest.json").read_text(encoding="utf-8"))
        return check_int("step", manifest.get("step") if isinstance(manifest, dict) else None, minimum=0)
    except (CheckpointError, OptionError, OSError, ValueError) as error:
        raise CliError(f"argument --resume: {one_line(error)}") from None


def restore(trainer: Trainer) -> tuple[int, list[str]]:
    """Load ``--resume``'s newest checkpoint; returns the steps it had done and notes for the log.

    The notes name the settings of the exact-resume contract that differ from the
    checkpoint's run (a resume still works; it just is not the same run any more).
    """
    config = trainer.config
    source = _resume_source(config)
    if source is None:
        return 0, []
    # A top-k schedule changes the layers' top_k, which the checkpoint records: the model
    # takes the routing of the checkpoint's step before loading it.
    trainer.routing.before_step(_saved_step(source))
    try:
        manifest = load_checkpoint(source, trainer.model, trainer.optimizer)
        done = check_int("step", manifest.get("step"), minimum=0)
    except (CheckpointError, OptionError, OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"argument --resume: {one_line(error)}") from None
    _refuse_finished(source, done, config)
    extra = manifest.get("extra")
    trainer.routing.load_state(extra.get("adaptive") if isinstance(extra, dict) else None)
    saved = extra.get("trainer") if isinstance(extra, dict) else None
    if not isinstance(saved, dict) or saved.get("version") != TRAINER_STATE_VERSION:
        return done, ["the checkpoint holds no trainer state (an older flexmoe): the resume may not be exact"]
    current = _trainer_state(trainer, done)
    notes = []
    changed = [f"{k} {saved.get(k)} -> {current[k]}" for k in _CONTRACT if saved.get(k) != current[k]]
    if changed:
        notes.append(f"not the same run any more, these settings changed: {', '.join(changed)}")
    if saved.get("world_size") != trainer.world:
        notes.append(
            f"resumed on {trainer.world} worker(s), the checkpoint's run had {saved.get('world_size')}: "
            "the same data when the global batch is, the same losses up to rounding"
        )
    return done, notes


def _trainer_state(trainer: Trainer, step: int) -> dict[str, Any]:
    """What a checkpoint records of the run (``extra["trainer"]``): its step and the exact-resume contract."""
    config = trainer.config
    return {
        "version": TRAINER_STATE_VERSION,
        "step": step,
        "seed": config.seed,
        "global_batch": config.batch_size * trainer.world,
        "context": config.context,
        "steps": config.steps,
        "lr": config.lr,
        "warmup": config.warmup,
        "capacity_factor": config.capacity_factor,
        "load_balance_weight": config.load_balance_weight,
        "plan": str(config.layer_plan(trainer.world)),
        "world_size": trainer.world,
        "random_streams": "data: seeded by (seed, step); model: by (seed, rank, step)",
    }


def train_batch(
    corpus: ByteCorpus, config: TrainConfig, step: int, rank: int, world: int
) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s inputs and targets ``[batch_size, context]`` of training step ``step``.

    The step's global batch (``batch_size * world`` windows) is drawn from a generator
    seeded by ``(seed, step)`` and each rank takes its slice, so the data of a step
    depend on nothing that happened before it (a resume continues the same stream).
    """
    generator = torch.Generator().manual_seed(stream_seed(config.seed, "data", step))
    x, y = corpus.batch("train", config.batch_size * world, config.context, generator)
    mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    return x[mine], y[mine]


def train_step(trainer: Trainer, x: Tensor, y: Tensor, *, step: int) -> StepResult:
    """One optimizer update on a batch: forward, backward, the expert-parallel gradient recipe, AdamW."""
    config, model = trainer.config, trainer.model
    torch.manual_seed(stream_seed(config.seed, "model", trainer.rank, step))  # any random draw in the model
    lr = learning_rate(config, step)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    logits = trainer.trained(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    aux_loss = model.aux_loss()
    (loss + aux_loss).backward()
    scale_expert_gradients(model)  # DDP averages the other gradients over workers
    # The norm of the whole gradient the optimizer sees (dense gradients DDP-averaged, counted
    # once; expert gradients summed over the ranks that hold them), before clipping: equal on
    # every worker, so the log needs no collective for it.
    grad_norm = clip_grad_norm_(model, 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    layers = [layer.stats for layer in model.moe_layers() if layer.stats is not None]
    top_p = [layer.config.router.top_p for layer in model.moe_layers()]
    return StepResult(
        loss=loss.detach(), aux_loss=aux_loss.detach(), lr=lr, grad_norm=grad_norm, layers=layers, top_p=top_p
    )


def _evaluate(trainer: Trainer, corpus: ByteCorpus) -> float:
    config = trainer.config
    batches = config.eval_batches
    return evaluate(
        trainer.trained, corpus, config.batch_size, config.context, batches, trainer.rank, trainer.world
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, corpus: ByteCorpus, batch_size: int, context: int, batches: int, rank: int, world: int
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
        x, y = corpus.batch("val", batch_size, context, generator)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses))


def save(trainer: Trainer, run_dir: Path, step: int) -> Path:
    """Checkpoint ``step`` into ``RUN_DIR/checkpoints`` with the trainer state a resume needs."""
    check_launcher_alive()  # a worker whose launcher is gone writes nothing more
    extra = {"settings": trainer.config.to_json(), "trainer": _trainer_state(trainer, step)}
    if (adaptive := trainer.routing.state()) is not None:
        extra["adaptive"] = adaptive
    return save_checkpoint(
        run_dir / "checkpoints",
        trainer.model,
        trainer.optimizer,
        step=step,
        extra=extra,
        keep=trainer.config.keep_checkpoints,
    )


def _routing_recorder(
    trainer: Trainer, run_dir: Path, *, start_step: int, log: RunLog
) -> RoutingRecorder | None:
    """``--trace``: a recorder from ``start_step`` on (a resumed run replaces the trace from there)."""
    config = trainer.config
    if config.trace is None:
        return None
    path = config.trace if config.trace.is_absolute() else run_dir / config.trace
    meta = {"command": "flexmoe train", "batch_size": config.batch_size, "context": config.context}
    try:
        recorder = RoutingRecorder(
            trainer.model, path, start_step=start_step, meta=meta, rank=trainer.rank, world_size=trainer.world
        )
    except (ValueError, OSError) as error:
        raise CliError(f"argument --trace: {one_line(error)}") from None
    log.say(f"recording the routing of every step to {path}")
    return recorder


def _describe(log: RunLog, corpus: ByteCorpus, trainer: Trainer, done: int, notes: list[str]) -> None:
    config, model = trainer.config, trainer.model
    params = sum(p.numel() for p in model.parameters())
    log.say(
        f"flexmoe train: {len(corpus.train) / 1e6:.1f} MB of training bytes from {corpus.source}\n"
        f"model: {config.layers} layers, dim {config.dim}, {config.experts} experts top-{config.top_k}, "
        f"{params / 1e6:.2f}M parameters on rank 0; batch {config.batch_size}x{config.context} tokens per "
        f"worker, {trainer.world} worker(s), {config.steps} steps; run directory {config.run_dir}"
    )
    if trainer.world > 1:
        layer = model.moe_layers()[0]
        plan = config.layer_plan(trainer.world)
        plan_text = "auto (the online tuner)" if isinstance(plan, str) else str(layer.resolve_plan(plan))
        log.say(
            f"expert parallel: {config.experts} experts over {trainer.world} workers "
            f"({layer.experts.num_experts} per worker), plan {plan_text}"
        )
    if config.resume is not None:
        log.say(f"resumed from {config.resume} at step {done}")
    for note in notes:
        log.say(f"note: {note}")


def _summarise(
    trainer: Trainer,
    run_dir: Path,
    log: RunLog,
    done: int,
    elapsed: float,
    initial: float,
    final: float,
    checkpoint: Path,
    recorder: RoutingRecorder | None,
) -> dict[str, Any]:
    """Write ``summary.json`` (rank 0), print the closing line; returns the summary."""
    config = trainer.config
    steps_run = config.steps - done
    tokens = steps_run * log.tokens_per_step
    last = trainer.model.moe_layers()[-1].stats
    summary = {
        "steps": steps_run,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "world_size": trainer.world,
        "checkpoint": str(checkpoint),
        "expert_backend": last.backend if last else None,
        "trace": None if recorder is None else str(recorder.path),
    }
    if trainer.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.say(
        f"done: {steps_run} steps, {tokens} tokens in {elapsed:.1f} s "
        f"({summary['tokens_per_s']:.0f} tok/s); eval loss {initial:.3f} -> {final:.3f}; "
        f"expert backend {summary['expert_backend']}; checkpoint {checkpoint}; "
        f"see `flexmoe report {run_dir}`"
    )
    return summary
