"""``flexmoe train --lora-rank N`` / ``--esft P``: fine-tune expert adapters of a trained model.

The base is either the main job's model from a ``flexmoe train`` run (``--init-from
RUN_DIR``: its settings and newest checkpoint) or a ``transformers`` MoE checkpoint
directory (``--hf-model DIR``, converted with ``flexmoe.hf.convert``). With
``--lora-rank`` every expert layer gets a LoRA adapter (``flexmoe.adapters.add_lora``);
with ``--esft P`` each layer's fewest experts that take ``P`` of the routing mass of the
first training batches get trainable copies (``esft_select``, ``esft_prepare``). Every
other parameter is frozen, and the run trains on the same offline text as ``flexmoe
train`` with its ``--steps``, ``--batch-size``, ``--context``, ``--lr`` (warm-up and
cosine), ``--seed``, ``--log-every``, ``--eval-every`` and ``--eval-batches``. A
``transformers`` model reads the text's bytes modulo its vocabulary as token ids: a
quick check that adapters train, not a recipe for a real task.

The run directory gets ``config.json`` (every setting, the adapter's under ``adapter``),
``adapter/`` (``adapter.json``: the method and its settings, and the adapter alone:
``adapter.safetensors``, ``lora_state_dict``, or ESFT's own files with just the chosen
experts), for a LoRA ``--hf-model`` run also ``adapter-peft/`` (the files PEFT writes,
loadable with ``PeftModel.from_pretrained``), and ``summary.json``. ``load_adapter_dir``
applies a saved adapter to a fresh copy of the base (an ESFT one is merged into it);
``main_job_model`` builds the base of an ``--init-from`` run. LoRA also runs on
``--workers N`` (or under ``torchrun``): an ``--init-from`` base spread as the main job
is, a ``--hf-model`` base with every block's experts spread evenly over the workers
(``flexmoe.hf.convert(group=...)``); ESFT runs take one worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flexmoe.hf
from flexmoe.adapters import (
    ESFTAdapter,
    add_lora,
    esft_prepare,
    esft_select,
    load_esft_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_esft_adapter,
    save_esft_adapter,
    save_peft_adapter,
)
from flexmoe.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from flexmoe.checkpoint.files import safetensors_torch
from flexmoe.cli.launch import RunLock, guard_worker, launch_workers, run_dir_lock
from flexmoe.cli.options import CliError, OptionError, one_line
from flexmoe.cli.train import build_model, evaluate, learning_rate, load_corpus, stream_seed, train_batch
from flexmoe.cli.train_config import TrainConfig
from flexmoe.models import ByteCorpus, TinyMoELM
from flexmoe.parallel import (
    all_reduce_mean,
    clip_grad_norm_,
    init_distributed,
    scale_expert_gradients,
    shutdown,
)

__all__ = [
    "METHODS",
    "AdapterOptions",
    "adapter_options_from_args",
    "add_adapter_arguments",
    "attach_adapter",
    "finetune",
    "load_adapter_dir",
    "main_job_model",
    "run_finetune",
]

METHODS = ("lora", "esft")
ESFT_SCORES = ("gate", "token")
ESFT_BATCHES = 8  # training batches whose routing chooses the ESFT experts
TARGETS = {"both": ("w_in", "w_out"), "w_in": ("w_in",), "w_out": ("w_out",)}
ADAPTER_JSON = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
PLAN_SETTINGS = ("plan", "plan_r", "plan_d", "exchange", "reroute")  # the fine-tune's, not the base run's


@dataclass(frozen=True, kw_only=True)
class AdapterOptions:
    """What to fine-tune and from which base (exactly one of ``init_from`` and ``hf_model``)."""

    method: Literal["lora", "esft"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    experts: tuple[int, ...] | None = None
    targets: tuple[str, ...] = ("w_in", "w_out")
    init_from: Path | None = None
    hf_model: Path | None = None
    esft_threshold: float = 0.2
    esft_score: Literal["gate", "token"] = "gate"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.esft_threshold <= 1.0:
            raise OptionError("esft", f"must be in (0, 1], got {self.esft_threshold!r}")
        if self.esft_score not in ESFT_SCORES:
            raise OptionError("esft_score", f"must be one of {ESFT_SCORES}, got {self.esft_score!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise OptionError("lora_rank", f"must be an int >= 1, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise OptionError("lora_alpha", f"must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError("lora_dropout", f"must be in [0, 1), got {self.dropout!r}")
        if (self.init_from is None) == (self.hf_model is None):
            raise OptionError("init_from", "give exactly one base: --init-from RUN_DIR or --hf-model DIR")

    def to_argv(self) -> list[str]:
        """The ``flexmoe train`` flags that give these options (what ``--workers`` hands its workers)."""
        base = ["--init-from", str(self.init_from)] if self.init_from is not None else []
        base += ["--hf-model", str(self.hf_model)] if self.hf_model is not None else []
        if self.method == "esft":
            return [f"--esft={self.esft_threshold!r}", f"--esft-score={self.esft_score}", *base]
        targets = next(flag for flag, chosen in TARGETS.items() if chosen == self.targets)
        experts = [] if self.experts is None else [f"--lora-experts={','.join(map(str, self.experts))}"]
        return [
            f"--lora-rank={self.rank}",
            f"--lora-alpha={self.alpha!r}",
            f"--lora-dropout={self.dropout!r}",
            f"--lora-targets={targets}",
            *experts,
            *base,
        ]

    def to_json(self) -> dict[str, Any]:
        """The settings, JSON-ready (what ``adapter.json`` records)."""
        out = dataclasses.asdict(self)
        out.update(
            init_from=None if self.init_from is None else str(self.init_from),
            hf_model=None if self.hf_model is None else str(self.hf_model),
            experts=None if self.experts is None else list(self.experts),
            targets=list(self.targets),
        )
        return out


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning options of ``flexmoe train`` (off unless ``--lora-rank`` is given)."""
    group = parser.add_argument_group("adapter fine-tuning (base frozen; see docs/adapters.md)")
    group.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        metavar="N",
        help="fine-tune LoRA adapters of rank N on the experts, base frozen (default: none: train)",
    )
    group.add_argument("--lora-alpha", type=float, default=16.0, metavar="X", help="LoRA alpha (default: 16)")
    group.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        metavar="X",
        help="dropout on the adapters' inputs (default: 0)",
    )
    group.add_argument(
        "--lora-experts",
        default=None,
        metavar="IDS",
        help="comma-separated expert ids to adapt in every layer (default: all)",
    )
    group.add_argument(
        "--lora-targets", choices=tuple(TARGETS), default="both", help="projections to adapt (default: both)"
    )
    group.add_argument(
        "--esft",
        type=float,
        default=None,
        metavar="P",
        help="expert-specialised fine-tuning instead: train each layer's fewest experts that take P of "
        "the task's routing mass (default: none)",
    )
    group.add_argument(
        "--esft-score",
        choices=ESFT_SCORES,
        default="gate",
        help="ESFT's routing mass: the routing weights (gate) or the routed tokens (token) (default: gate)",
    )
    group.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="the base: a flexmoe train run (default: none)",
    )
    group.add_argument(
        "--hf-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="the base: a transformers MoE checkpoint directory (default: none)",
    )


def adapter_options_from_args(args: argparse.Namespace) -> AdapterOptions | None:
    """The fine-tuning options given, or ``None`` for ordinary training; ``CliError`` when inconsistent."""
    if args.lora_rank is not None and args.esft is not None:
        raise CliError("argument --esft: choose one adapter, --lora-rank N or --esft P")
    if args.esft is not None:
        if args.lora_experts is not None:
            raise CliError("argument --lora-experts: ESFT chooses its experts from the routing (--esft P)")
        try:
            return AdapterOptions(
                method="esft",
                esft_threshold=args.esft,
                esft_score=args.esft_score,
                init_from=args.init_from,
                hf_model=args.hf_model,
            )
        except OptionError as error:
            raise CliError(f"argument --{error.option.replace('_', '-')}: {error.reason}") from None
    if args.lora_rank is None:
        for name in ("init_from", "hf_model", "lora_experts"):
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise CliError(f"argument {flag}: needs an adapter to fine-tune (--lora-rank N or --esft P)")
        return None
    experts = None
    if args.lora_experts is not None:
        try:
            experts = tuple(int(part) for part in args.lora_experts.split(","))
        except ValueError:
            raise CliError(
                f"argument --lora-experts: expected comma-separated expert ids, got {args.lora_experts!r}"
            ) from None
    try:
        return AdapterOptions(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            experts=experts,
            targets=TARGETS[args.lora_targets],
            init_from=args.init_from,
            hf_model=args.hf_model,
        )
    except OptionError as error:
        raise CliError(f"argument --{error.option.replace('_', '-')}: {error.reason}") from None


# ---------------------------------------------------------------- the bases
def _checkpoints(run_dir: Path) -> Path:
    return run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir


def main_job_model(
    run_dir: Path, rank: int = 0, world: int = 1, plan: TrainConfig | None = None
) -> TinyMoELM:
    """The main job's model of a ``flexmoe train`` run (or checkpoint folder), from its newest checkpoint.

    With ``world > 1`` its experts are spread over the ranks (a collective) with the plan
    settings of ``plan`` (``--plan``, ``--plan-r``, ...; default: the run's own).
    """
    source = _checkpoints(Path(run_dir))
    try:
        manifest = json.loads((latest_checkpoint(source) / "manifest.json").read_text(encoding="utf-8"))
        settings = manifest["extra"]["settings"]
        if plan is not None:
            settings = {**settings, **{key: getattr(plan, key) for key in PLAN_SETTINGS}}
        base = TrainConfig(**{**settings, "workers": world, "run_dir": None, "resume": None})
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, OptionError) as error:
        raise CliError(f"argument --init-from: {one_line(error)}") from None
    model = build_model(base, rank, world)
    try:
        load_checkpoint(source, model)
    except CheckpointError as error:
        raise CliError(f"argument --init-from: {one_line(error)}") from None
    return model


class _Logits(nn.Module):
    """A ``transformers`` causal LM returning its logits (what ``evaluate`` and the loss read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        logits: Tensor = self.model(ids).logits
        return logits


def _hf_model(directory: Path, world: int = 1) -> nn.Module:
    """A ``transformers`` MoE checkpoint, converted to flexmoe's layers, in fp32.

    With ``world > 1`` every block's experts are spread over the default process group
    (a collective: every rank loads the checkpoint and keeps its experts' rows).
    """
    try:
        transformers = importlib.import_module("transformers")  # an optional extra: flexmoe[hf]
    except ImportError:
        raise CliError("argument --hf-model: needs transformers (pip install 'flexmoe[hf]')") from None
    try:
        model: nn.Module = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32
        )
        flexmoe.hf.convert(model, group=None if world > 1 else False)
    except (OSError, ValueError, TypeError) as error:
        raise CliError(f"argument --hf-model: {one_line(error)}") from None
    return model


@dataclass(frozen=True)
class Attached:
    """An adapter attached for training: its parameters, and the ESFT adapter (what is saved) if ESFT."""

    parameters: list[nn.Parameter]
    esft: ESFTAdapter | None = None


def attach_adapter(
    model: nn.Module, options: AdapterOptions, batches: list[Tensor] | None = None
) -> Attached:
    """Attach the adapter ``options`` describe to every expert layer and freeze the rest.

    ESFT chooses its experts by their routing on ``batches`` (samples of the task's data).
    """
    if options.method == "esft":
        if not batches:
            raise ValueError("batches: ESFT chooses its experts from the task's routing; give some batches")
        selection = esft_select(model, batches, options.esft_threshold, options.esft_score)
        adapter = esft_prepare(model, selection, options.esft_score, options.esft_threshold)
        parameters = [p for p in adapter.parameters() if isinstance(p, nn.Parameter)]
        return Attached(parameters, adapter)
    try:
        add_lora(
            model,
            options.rank,
            options.alpha,
            options.dropout,
            experts=options.experts,
            targets=options.targets,
        )
    except ValueError as error:
        raise CliError(f"argument --lora-experts: {one_line(error)}") from None
    return Attached([p for p in model.parameters() if p.requires_grad])


# ---------------------------------------------------------------- the run
def run_finetune(config: TrainConfig, options: AdapterOptions) -> dict[str, Any]:
    """``flexmoe train`` with adapter options: fine-tune, save the adapter; returns the summary.

    With ``--workers N`` (or under ``torchrun``) as the main job runs: this process
    launches ``N`` workers and returns the summary they wrote.
    """
    _check_workers(config.workers, options)
    if config.workers == 1 and "LOCAL_RANK" not in os.environ:
        return finetune(config, options)[1]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    config = dataclasses.replace(config, run_dir=config.run_dir or Path("runs") / f"finetune-{stamp}")
    run_dir = config.run_dir
    assert run_dir is not None
    if "LOCAL_RANK" not in os.environ:
        lock = RunLock.acquire(run_dir)
        try:
            launch_workers([*config.to_argv(), *options.to_argv()], config.workers, lock)
        finally:
            lock.release()
        summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        return summary
    launched = guard_worker()
    rank, world = init_distributed()
    try:
        with run_dir_lock(run_dir, rank, launched=launched):
            return finetune(config, options, rank, world)[1]
    finally:
        shutdown()


def _check_workers(workers: int, options: AdapterOptions) -> None:
    if workers > 1 and options.method == "esft":
        raise CliError("argument --workers: ESFT fine-tuning runs on one worker")


def finetune(
    config: TrainConfig, options: AdapterOptions, rank: int = 0, world: int = 1
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune (see the module docstring) as rank ``rank`` of ``world``; returns the model and the summary.

    On several ranks the experts (and their adapters) are spread over them and each
    rank trains on its slice of every global batch (``batch_size * world`` windows, the
    data of one worker with that batch size), the gradients those of the global batch's
    mean loss; rank 0 writes the run directory. Every rank calls it.
    """
    _check_workers(world, options)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = config.run_dir or Path("runs") / f"finetune-{stamp}"
    torch.manual_seed(config.seed)
    model: nn.Module
    run_model: nn.Module
    if options.init_from is not None:
        main_job = main_job_model(options.init_from, rank, world, config)
        context = min(config.context, main_job.config.context)  # the model's positions end there
        model = run_model = main_job
    else:
        assert options.hf_model is not None
        model = _hf_model(options.hf_model, world)
        context = config.context
        run_model = _Logits(model)
    config = dataclasses.replace(config, context=context, run_dir=run_dir)
    corpus = _in_vocabulary(load_corpus(config), _vocab(run_model))
    task = [train_batch(corpus, config, step, 0, 1)[0] for step in range(1, ESFT_BATCHES + 1)]
    torch.manual_seed(config.seed)  # the adapter's A: the same draw on any number of workers
    attached = attach_adapter(model, options, task)
    trainable = attached.parameters
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate(config, 1), weight_decay=0.0)
    say = print if rank == 0 else _quiet
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        settings = {**config.to_json(), "adapter": options.to_json()}
        (run_dir / "config.json").write_text(json.dumps(settings, indent=1) + "\n")
    count = sum(p.numel() for p in trainable)
    if world > 1:  # the single-device adapter's size (each rank holds zero rows besides its part)
        count = sum(v.numel() for k, v in lora_state_dict(model).items() if not k.endswith("expert_ids"))
    workers = f" on {world} workers" if world > 1 else ""
    what = f"{options.method} adapters ({count} parameters, base frozen){workers}"
    say(f"fine-tuning {what} for {config.steps} steps")
    initial = evaluate(run_model, corpus, config.batch_size, context, config.eval_batches, rank, world)
    say(f"initial eval loss {initial:.3f}")
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        torch.manual_seed(stream_seed(config.seed, "model", rank, step))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        x, y = train_batch(corpus, config, step, rank, world)
        loss = F.cross_entropy(run_model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if world > 1:  # the adapters are expert parameters: their gradients sum every rank's loss
            scale_expert_gradients(model)
            clip_grad_norm_(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.log_every == 0 or step == config.steps:
            say(f"step {step:5d}  loss {all_reduce_mean(loss.item()):.3f}")
        if step % config.eval_every == 0 and step != config.steps:
            say(f"step {step:5d}  eval loss {_eval(run_model, corpus, config, rank, world):.3f}")
    elapsed = time.perf_counter() - start
    final = _eval(run_model, corpus, config, rank, world)
    adapter_dir = save_adapter_dir(model, run_dir / "adapter", options, attached.esft, rank)
    summary: dict[str, Any] = {
        "method": options.method,
        "steps": config.steps,
        "workers": world,
        "seconds": elapsed,
        "trainable_parameters": count,
        "initial_eval_loss": initial,
        "final_eval_loss": final,
        "adapter": str(adapter_dir),
    }
    if attached.esft is not None:
        summary["esft_experts"] = {path: list(e.expert_ids) for path, e in attached.esft.layers.items()}
    if options.hf_model is not None and attached.esft is None:
        summary["adapter_peft"] = str(save_peft_adapter(model, run_dir / "adapter-peft"))
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done: eval loss {initial:.3f} -> {final:.3f}; adapter saved to {adapter_dir}")
    return model, summary


def _quiet(*_: object) -> None:
    """``print`` on ranks other than 0: one worker speaks for the run."""


def _in_vocabulary(corpus: ByteCorpus, vocab_size: int) -> ByteCorpus:
    """The text as token ids of a model with ``vocab_size`` ids: its bytes modulo the vocabulary."""
    if vocab_size >= 256:
        return corpus
    as_ids = [(part.long() % vocab_size).to(torch.uint8) for part in (corpus.train, corpus.val)]
    return ByteCorpus(train=as_ids[0], val=as_ids[1], source=f"{corpus.source} (bytes mod {vocab_size})")


def _vocab(run_model: nn.Module) -> int:
    model = run_model.model if isinstance(run_model, _Logits) else run_model
    config: Any = model.config
    return int(config.vocab_size)


def _eval(run_model: nn.Module, corpus: Any, config: TrainConfig, rank: int, world: int) -> float:
    return evaluate(run_model, corpus, config.batch_size, config.context, config.eval_batches, rank, world)


# ---------------------------------------------------------------- saving
def save_adapter_dir(
    model: nn.Module, directory: Path, options: AdapterOptions, esft: ESFTAdapter | None = None, rank: int = 0
) -> Path:
    """Write ``adapter.json`` and the adapter alone: ``adapter.safetensors`` (LoRA) or ESFT's files.

    A model with distributed layers: every rank calls it (the adapter is gathered), rank 0 writes.
    """
    state = None if esft is not None else lora_state_dict(model)  # a collective when distributed
    if rank != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_JSON).write_text(json.dumps(options.to_json(), indent=1) + "\n")
    if esft is not None:
        save_esft_adapter(esft, directory)
        return directory
    assert state is not None
    tensors = {key: value.contiguous().cpu() for key, value in state.items()}
    safetensors_torch().save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter_dir(model: nn.Module, directory: Path) -> AdapterOptions:
    """Attach the adapter saved by a fine-tuning run (its ``adapter/`` folder) to ``model``, the same base."""
    folder = Path(directory)
    settings = json.loads((folder / ADAPTER_JSON).read_text(encoding="utf-8"))
    settings["experts"] = None if settings["experts"] is None else tuple(settings["experts"])
    settings["targets"] = tuple(settings["targets"])
    for key in ("init_from", "hf_model"):
        settings[key] = None if settings[key] is None else Path(settings[key])
    options = AdapterOptions(**settings)
    if options.method == "esft":  # the trained experts written into the base's
        merge_esft_adapter(model, load_esft_adapter(folder))
        return options
    attach_adapter(model, options)
    load_lora_state_dict(model, safetensors_torch().load_file(str(folder / ADAPTER_WEIGHTS)))
    return options
