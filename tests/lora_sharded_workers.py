"""Worker functions for the tests of LoRA on sharded experts (``num_experts < W``).

Each rank holds one hidden shard of its expert and its part of the expert's adapter
(``B_in`` and ``A_out`` cut like ``w_in`` and ``w_out``, ``A_in`` and ``B_out`` whole on
every shard); the oracle is the single-device layer of ``lora_parallel_workers``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from flexmoe import MoELayer
from flexmoe.adapters import lora_state_dict
from flexmoe.experts.lora import FACTOR_SHARDS
from flexmoe.parallel import clip_grad_norm_

from .lora_parallel_workers import FACTORS, LoRACase, assert_near, layers_for, single_device_factor_grads


def sharded_cases(world: int, count: int, seed: int) -> list[LoRACase]:
    """``count`` cases with ``E < W`` from ``seed``: experts, activation, bias, capacity, subset, targets."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        E = rng.choice([e for e in range(1, world) if world % e == 0])
        subset = sorted(rng.sample(range(E), rng.randint(1, E)))
        cases.append(
            LoRACase(
                num_experts=E,
                top_k=rng.randint(1, E),
                activation=rng.choice(["swiglu", "gelu"]),
                bias=rng.random() < 0.3,
                capacity_factor=rng.choice([0.0, 1.0, 1.25]),
                tokens_per_rank=[rng.randint(0, 9) for _ in range(world)],
                rank=rng.choice([1, 2, 4]),
                experts=None if len(subset) == E else subset,
                targets=rng.choice([("w_in", "w_out"), ("w_in",), ("w_out",)]),
                seed=seed * 100 + i,
            )
        )
    return cases


def whole_factor_copies(layer: MoELayer) -> dict[str, list[Any]]:
    """This rank's copies of ``A_in`` and ``B_out`` and their gradients, as nested lists.

    Every shard of an expert must hold the same (the test compares them across ranks).
    """
    adapter = layer.experts.lora
    assert adapter is not None
    out = {}
    for name in FACTORS:
        param = getattr(adapter, name)
        if param is not None and FACTOR_SHARDS[name] is None:
            out[name] = param.detach().tolist()
            if param.grad is not None:
                out[f"{name}.grad"] = param.grad.tolist()
    return out


def check_sharded_training(rank: int, world: int, num_experts: int, steps: int) -> list[dict[str, list[Any]]]:
    """AdamW steps and gradient norms equal the oracle's; returns the whole factors' copies per backward."""
    case = LoRACase(num_experts=num_experts, top_k=1, experts=[num_experts - 1], seed=21)
    oracle, layer = layers_for(case)
    oracle_opt = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=0.05)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    plans = layer.valid_plans(degrees=(1,), exchanges=("flat",))
    copies = []
    for step in range(steps):
        torch.manual_seed(step)
        x_global = torch.randn(6 * world, 16)
        oracle(x_global).square().sum().backward()
        want_norm = torch.stack([p.grad.norm() for p in oracle.parameters() if p.grad is not None]).norm()
        oracle_opt.step()
        oracle_opt.zero_grad()
        layer(x_global.chunk(world)[rank], plan=plans[step % len(plans)]).square().sum().backward()
        norm = clip_grad_norm_(layer, 1e9)  # A_in and B_out, whole on every shard, count once
        torch.testing.assert_close(norm, float(want_norm), rtol=1e-5, atol=0.0)
        copies.append(whole_factor_copies(layer))
        opt.step()
        opt.zero_grad()
    copies.append(whole_factor_copies(layer))
    got, want = lora_state_dict(layer), lora_state_dict(oracle)
    assert got.keys() == want.keys()
    for key in want:
        assert_near(f"rank {rank}: {key} after training", got[key], want[key])
    return copies


def check_sharded_dropout(rank: int, world: int, num_experts: int) -> tuple[float, dict[str, list[Any]]]:
    """With dropout each shard draws its own masks: the change it makes, and the whole factors' copies."""
    _, layer = layers_for(LoRACase(num_experts=num_experts, top_k=1, seed=31))
    adapter = layer.experts.lora
    assert adapter is not None
    adapter.dropout = 0.5
    layer.train()
    torch.manual_seed(100 + rank)
    x = torch.randn(8, 16)
    with torch.no_grad():
        layer.eval()
        undropped = layer(x)
        layer.train()
    y = layer(x)
    y.square().sum().backward()
    grads = single_device_factor_grads(layer)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), "every factor gets a gradient"
    return float((y - undropped).abs().max()), whole_factor_copies(layer)
