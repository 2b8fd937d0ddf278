"""Fewer experts per token at inference: the quality it costs against the speed it gains.

A model trained with top-``k`` routing is run with a lower ``top_k`` and with top-p
routing (``flexmoe.hf.set_routing``; the layers are ``MoELayer`` s, so the same call as
for a converted ``transformers`` model). For each setting, against the unchanged model:

1. Quality, on held-out real text (the validation split of the main job's corpus, the
   same fixed windows for every setting): mean routed experts per token and layer, the
   eval loss and its change, the perplexity ratio ``exp(delta loss)``, the max and mean
   absolute logit error, the KL divergence from the unchanged model's next-token
   distribution, and how often the most likely next token stays the same.
2. Speed, in paired rounds (every setting once per round, round-robin; ratios are
   medians over rounds of the ratio within a round): scoring throughput (one forward
   over ``--batch-size`` windows of ``--context`` tokens) and greedy decoding of
   ``--new-tokens`` tokens from one prompt. The model has no KV cache: each decoding
   step runs the whole window (at most ``context`` tokens) again, so decoding measures
   short forwards, not a cached decoder.

The model: ``--run-dir`` of a ``flexmoe train`` run (its newest checkpoint), or, by
default, a short ``flexmoe train`` run made here (``--steps``, ``--experts``, ``--top-k``).

A renormalising router (the main job's) gives a token that keeps one expert its raw
probability as weight (flexmoe's top-1 rule), not weight 1 as a renormalised top-1 would.

    python benchmarks/routing_override.py          # trains a short top-4 model first (200 steps)
    python benchmarks/routing_override.py --run-dir runs/train-X --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmoe.checkpoint import load_checkpoint
from flexmoe.cli import main as flexmoe_main
from flexmoe.cli.train import build
from flexmoe.cli.train_config import TrainConfig
from flexmoe.hf import routing_settings, set_routing
from flexmoe.hf.routing import moe_layers
from flexmoe.models import ByteCorpus, TinyMoELM, stdlib_corpus
from harness import Timing, environment, measure_interleaved, write_json

Setting = dict[str, Any]  # set_routing's keyword arguments; {} is the unchanged model


def train_here(args: argparse.Namespace, directory: Path) -> Path:
    """A short ``flexmoe train`` run into ``directory`` (its output hidden)."""
    argv = ["train", "--run-dir", str(directory), "--steps", str(args.steps), "--no-progress"]
    argv += ["--experts", str(args.experts), "--top-k", str(args.top_k), "--eval-every", str(args.steps)]
    print(f"training: flexmoe {' '.join(argv[1:])}", flush=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        flexmoe_main(argv)
    return directory


def load_run(run_dir: Path, device: torch.device) -> tuple[TinyMoELM, TrainConfig]:
    """The model of a ``flexmoe train`` run directory at its newest checkpoint, on one device."""
    recorded = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {name: value for name, value in recorded.items() if name in fields}  # not world_size
    # one process here, whatever the run used; its checkpoint loads at any worker count
    settings |= {"workers": 1, "run_dir": None, "resume": None, "trace": None, "tensorboard": None}
    config = TrainConfig(**settings)
    model = build(config, rank=0, world=1).model
    load_checkpoint(run_dir / "checkpoints", model)
    return model.to(device).eval(), config


def settings_to_try(top_k: int, top_ps: list[float]) -> list[Setting]:
    """The unchanged model, every lower top-k, then top-p routing at each threshold."""
    return [{}, *({"top_k": k} for k in range(top_k - 1, 0, -1)), *({"top_p": p} for p in top_ps)]


def label(setting: Setting) -> str:
    return ", ".join(f"{name}={value}" for name, value in setting.items()) or "trained"


@contextlib.contextmanager
def routed(model: TinyMoELM, setting: Setting) -> Iterator[None]:
    """``model`` with ``setting`` inside the block (nothing for the unchanged model)."""
    if not setting:
        yield
        return
    with set_routing(model, **setting):
        yield


@dataclasses.dataclass
class Quality:
    experts_per_token: float
    loss: float
    max_logit_error: float
    mean_logit_error: float
    kl: float  # mean KL(unchanged || this) of the next-token distributions, nats
    same_top1: float  # fraction of positions whose most likely next token is unchanged


def eval_batches(
    args: argparse.Namespace, corpus: ByteCorpus, context: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """Fixed windows of the validation text (seeded as ``flexmoe train`` evaluates)."""
    batches = []
    for b in range(args.eval_batches):
        x, y = corpus.batch("val", args.batch_size, context, torch.Generator().manual_seed(1234 + b))
        batches.append((x.to(device), y.to(device)))
    return batches


@torch.no_grad()
def quality(
    model: TinyMoELM, batches: list[tuple[Tensor, Tensor]], reference: list[Tensor] | None
) -> tuple[Quality, list[Tensor]]:
    """The setting in force, scored on ``batches`` against the unchanged model's logits."""
    losses, max_errors, errors, kls, same = [], [], [], [], []
    choices = tokens = 0.0
    logits_all = []
    for index, (x, y) in enumerate(batches):
        logits = model(x).float()
        logits_all.append(logits)
        for layer in model.moe_layers():
            stats = layer.stats
            choices += stats.mean_experts_per_token * stats.num_tokens
            tokens += stats.num_tokens
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        base = logits if reference is None else reference[index]
        error = (logits - base).abs()
        max_errors.append(error.max().item())
        errors.append(error.mean().item())
        log_p, log_q = base.log_softmax(-1), logits.log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1).mean().item())
        same.append((logits.argmax(-1) == base.argmax(-1)).float().mean().item())
    n = len(batches)
    result = Quality(
        experts_per_token=choices / tokens,
        loss=sum(losses) / n,
        max_logit_error=max(max_errors),
        mean_logit_error=sum(errors) / n,
        kl=sum(kls) / n,
        same_top1=sum(same) / n,
    )
    return result, logits_all


def decoder(model: TinyMoELM, prompt: Tensor, new_tokens: int, context: int) -> Callable[[], Tensor]:
    """Greedy decoding of ``new_tokens`` from ``prompt [1, P]`` (the window: the last ``context`` tokens)."""

    @torch.no_grad()
    def decode() -> Tensor:
        tokens = prompt
        for _ in range(new_tokens):
            logits = model(tokens[:, -context:])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens

    return decode


def speeds(
    args: argparse.Namespace,
    model: TinyMoELM,
    settings: list[Setting],
    batches: list[tuple[Tensor, Tensor]],
    context: int,
    device: torch.device,
) -> dict[str, dict[str, Timing]]:
    """Scoring and decoding times of every setting, interleaved round by round."""
    x = batches[0][0]
    prompt = x[:1, : args.prompt_tokens]
    decode = decoder(model, prompt, args.new_tokens, context)

    def timed(setting: Setting, work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with routed(model, setting):
                work()

        return run

    scoring = {label(s): timed(s, lambda: model(x)) for s in settings}
    decoding = {label(s): timed(s, decode) for s in settings}
    with torch.no_grad():
        return {
            "scoring": measure_interleaved(scoring, repeats=args.rounds, device=device),
            "decoding": measure_interleaved(decoding, repeats=args.rounds, device=device),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="a flexmoe train run (default: train one here)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps of the run made here")
    parser.add_argument("--experts", type=int, default=8, help="experts of the run made here")
    parser.add_argument("--top-k", type=int, default=4, help="trained top-k of the run made here")
    parser.add_argument("--top-p", type=float, nargs="*", default=[0.9, 0.7, 0.5], help="top-p thresholds")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per eval and scoring batch")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="paired timing rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or train_here(args, Path(scratch) / "run")
        model, config = load_run(run_dir, device)
    trained = routing_settings(model)[0]
    print(
        f"model: {config.layers} layers, dim {config.dim}, {config.experts} experts of hidden "
        f"{config.expert_hidden}, trained top-{config.top_k}"
        + (f" top-p {config.top_p}" if config.top_p is not None else "")
        + f", {config.steps} steps; {len(moe_layers(model))} MoE layers; device {device}"
    )
    settings = settings_to_try(trained.top_k, args.top_p)
    corpus = stdlib_corpus()  # the main job's text; its validation split is held out from training
    batches = eval_batches(args, corpus, config.context, device)

    rows: dict[str, Quality] = {}
    reference: list[Tensor] | None = None
    for setting in settings:
        with routed(model, setting):
            rows[label(setting)], logits = quality(model, batches, reference)
        if reference is None:
            reference = logits
    timings = speeds(args, model, settings, batches, config.context, device)

    base = rows["trained"]
    tokens = args.eval_batches * args.batch_size * config.context
    print(f"quality on {tokens} held-out tokens ({corpus.source}); speed: {args.rounds} paired rounds")
    header = (
        f"{'setting':<14} {'experts/tok':>11} {'eval loss':>9} {'d loss':>7} {'ppl x':>6} {'max |dz|':>8} "
        f"{'mean |dz|':>9} {'KL':>7} {'same top1':>9} {'score x':>7} {'decode x':>8} {'decode tok/s':>12}"
    )
    print(header)
    results = []
    for name, q in rows.items():
        score, decode = timings["scoring"][name], timings["decoding"][name]
        score_speedup = score.paired_speedup(timings["scoring"]["trained"])
        decode_speedup = decode.paired_speedup(timings["decoding"]["trained"])
        decode_rate = args.new_tokens / decode.median
        delta = q.loss - base.loss
        print(
            f"{name:<14} {q.experts_per_token:>11.2f} {q.loss:>9.4f} {delta:>+7.4f} {math.exp(delta):>6.3f} "
            f"{q.max_logit_error:>8.3f} {q.mean_logit_error:>9.4f} {q.kl:>7.4f} {q.same_top1:>9.1%} "
            f"{score_speedup:>7.2f} {decode_speedup:>8.2f} {decode_rate:>12.1f}"
        )
        results.append(
            {
                "setting": name,
                **dataclasses.asdict(q),
                "loss_change": delta,
                "perplexity_ratio": math.exp(delta),
                "scoring": score,
                "scoring_speedup": score_speedup,
                "decoding": decode,
                "decoding_speedup": decode_speedup,
                "decode_tokens_per_s": decode_rate,
            }
        )
    print(
        "x: speed-up over the trained routing (paired medians); scoring: one forward of "
        f"{args.batch_size}x{config.context} tokens; decoding: {args.new_tokens} greedy tokens after "
        f"{args.prompt_tokens}, no KV cache"
    )
    write_json(
        args.json,
        {
            "environment": environment(),
            "run_dir": str(args.run_dir) if args.run_dir else None,
            "model": config.to_json(),
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
