"""``flexmoe demo``: train a small MoE byte-level LM on the standard library's source, and report."""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from flexmoe.models import TinyMoELM, TinyMoELMConfig, stdlib_corpus

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


@torch.no_grad()
def _eval_loss(model: TinyMoELM, corpus: object, batch_size: int, context: int, batches: int = 4) -> float:
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(batches):
        x, y = corpus.batch("val", batch_size, context, generator)  # type: ignore[attr-defined]
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def run_demo(args: argparse.Namespace) -> None:
    """Train, printing loss, throughput and per-layer load balance; then a summary."""
    for name in ("steps", "batch_size", "context", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    corpus = stdlib_corpus()
    config = TinyMoELMConfig(
        context=args.context,
        dim=args.dim,
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden_dim=args.expert_hidden,
        capacity_factor=args.capacity_factor,
    )
    model = TinyMoELM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"flexmoe demo: {len(corpus.train) / 1e6:.1f} MB of training bytes from {corpus.source}\n"
        f"model: {config.num_layers} layers, dim {config.dim}, "
        f"{config.num_experts} experts top-{config.top_k}, "
        f"{params / 1e6:.2f}M parameters; batch {args.batch_size}x{args.context} tokens, {args.steps} steps"
    )
    initial = _eval_loss(model, corpus, args.batch_size, args.context)
    print(f"initial eval loss {initial:.3f} (uniform over bytes would be {math.log(256):.3f})")
    tokens_per_step = args.batch_size * args.context
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    for step in range(1, args.steps + 1):
        x, y = corpus.batch("train", args.batch_size, args.context, generator)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (loss + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            loads = " ".join(
                f"{layer.stats.load_max_over_mean:.2f}" for layer in model.moe_layers() if layer.stats
            )
            dropped = sum(layer.stats.dropped for layer in model.moe_layers() if layer.stats)
            print(
                f"step {step:5d}  loss {loss.item():.3f}  aux {model.aux_loss().item():.4f}  "
                f"{window_tokens / (now - window_start):8.0f} tok/s  load max/mean per layer [{loads}]  "
                f"dropped {dropped}"
            )
            window_start, window_tokens = now, 0
    elapsed = time.perf_counter() - start
    final = _eval_loss(model, corpus, args.batch_size, args.context)
    last = model.moe_layers()[-1].stats
    print(
        f"done: {args.steps} steps, {args.steps * tokens_per_step} tokens in {elapsed:.1f} s "
        f"({args.steps * tokens_per_step / elapsed:.0f} tok/s); eval loss {initial:.3f} -> {final:.3f}; "
        f"expert backend {last.backend if last else '?'}"
    )
