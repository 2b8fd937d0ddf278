"""``flexmoe demo``: train a small MoE byte-level LM on the standard library's source, and report.

``--workers N`` trains on ``N`` local processes (gloo on CPU, NCCL on GPUs) launched
with ``torchrun``: the MoE layers' experts are spread over the workers (expert
parallelism with the plan given by ``--plan-r/--plan-d/--exchange``), the other
parameters are data-parallel (DDP), and every worker reads its own batches. Running
the demo under ``torchrun`` directly does the same.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

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

__all__ = ["add_demo_arguments", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options."""
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument(
        "--capacity-factor", type=float, default=0.0, help=">0 fixed, <0 adaptive cap, 0 dropless"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument(
        "--workers", type=int, default=1, help="local worker processes (expert + data parallel); 1: no launch"
    )
    parser.add_argument("--plan-r", type=int, default=None, help="plan sharing degree r (default: layer's)")
    parser.add_argument("--plan-d", type=int, default=1, help="plan pipelining degree d")
    parser.add_argument("--exchange", choices=["flat", "2dh"], default="flat", help="all-to-all algorithm")


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
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"flexmoe demo: a worker failed (exit code {result.returncode})")


@torch.no_grad()
def _eval_loss(
    model: torch.nn.Module, corpus: object, batch_size: int, context: int, seed: int, batches: int = 4
) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234 + seed)
    losses = []
    for _ in range(batches):
        x, y = corpus.batch("val", batch_size, context, generator)  # type: ignore[attr-defined]
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return all_reduce_mean(sum(losses) / len(losses))


def run_demo(args: argparse.Namespace) -> None:
    """Train, printing loss, throughput and per-layer load balance; then a summary."""
    for name in ("steps", "batch_size", "context", "log_every", "workers", "plan_d"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers > 1 and "LOCAL_RANK" not in os.environ:
        _launch_workers(args)
        return
    rank, world = init_distributed()
    try:
        _train(args, rank, world)
    finally:
        shutdown()


def _train(args: argparse.Namespace, rank: int, world: int) -> None:
    # Non-expert parameters start equal on every rank (DDP and the layers broadcast
    # rank 0's anyway); expert parameters differ per rank: each rank holds other experts.
    torch.manual_seed(args.seed + rank)
    corpus = stdlib_corpus()
    say = print if rank == 0 else (lambda *_, **__: None)
    config = TinyMoELMConfig(
        context=args.context,
        dim=args.dim,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden_dim=args.expert_hidden,
        capacity_factor=args.capacity_factor,
        plan=Plan(r=args.plan_r, d=args.plan_d, exchange=args.exchange) if world > 1 else None,
    )
    model = TinyMoELM(config)
    trained = wrap_data_parallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1000 * rank)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"flexmoe demo: {len(corpus.train) / 1e6:.1f} MB of training bytes from {corpus.source}\n"
        f"model: {config.num_layers} layers, dim {config.dim}, "
        f"{config.num_experts} experts top-{config.top_k}, "
        f"{params / 1e6:.2f}M parameters on rank 0; batch {args.batch_size}x{args.context} tokens per "
        f"worker, {world} worker(s), {args.steps} steps"
    )
    if world > 1:
        layer = model.moe_layers()[0]
        assert layer._ep is not None and config.plan is not None
        say(
            f"expert parallel: {config.num_experts} experts over {world} workers "
            f"({layer.experts.num_experts} per worker), plan {layer._ep.placement.resolve(config.plan)}"
        )
    initial = _eval_loss(trained, corpus, args.batch_size, args.context, rank)
    say(f"initial eval loss {initial:.3f} (uniform over bytes would be {math.log(256):.3f})")
    tokens_per_step = args.batch_size * args.context * world
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    for step in range(1, args.steps + 1):
        x, y = corpus.batch("train", args.batch_size, args.context, generator)
        logits = trained(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (loss + model.aux_loss()).backward()
        scale_expert_gradients(model)  # DDP averages the other gradients over workers
        clip_grad_norm_(model, 1.0)  # the global norm: equal on every worker
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            loads = " ".join(
                f"{layer.stats.load_max_over_mean:.2f}" for layer in model.moe_layers() if layer.stats
            )
            dropped = sum(layer.stats.dropped for layer in model.moe_layers() if layer.stats)
            mean_loss = all_reduce_mean(loss.item())  # a collective: every worker runs it
            say(
                f"step {step:5d}  loss {mean_loss:.3f}  aux {model.aux_loss().item():.4f}  "
                f"{window_tokens / (now - window_start):8.0f} tok/s  load max/mean per layer [{loads}]  "
                f"dropped {dropped}"
            )
            window_start, window_tokens = now, 0
    elapsed = time.perf_counter() - start
    final = _eval_loss(trained, corpus, args.batch_size, args.context, rank)
    last = model.moe_layers()[-1].stats
    say(
        f"done: {args.steps} steps, {args.steps * tokens_per_step} tokens in {elapsed:.1f} s "
        f"({args.steps * tokens_per_step / elapsed:.0f} tok/s); eval loss {initial:.3f} -> {final:.3f}; "
        f"expert backend {last.backend if last else '?'}"
    )
