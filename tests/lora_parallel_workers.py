"""Worker functions for the LoRA-under-expert-parallelism tests (importable by spawned processes).

Each case builds a single-device ``MoELayer`` with a LoRA adapter (the oracle, itself
checked against base + dense per-expert deltas in ``test_lora``) and a distributed layer
loaded with the same base weights and the same adapter, runs the global batch through
the oracle and each rank's slice through the distributed layer under every plan, and
compares outputs and gradients: the input's and the LoRA factors' (gathered into the
single-device layout); the base is frozen and gets none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import flexmoe.hf
from flexmoe import MoELayer, Plan, RouterConfig
from flexmoe.adapters import (
    add_lora,
    load_lora_state_dict,
    load_peft_adapter,
    lora_adapters,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
    unmerge_lora,
)
from flexmoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flexmoe.experts.lora import FACTOR_SHARDS

from .hf_tiny import VOCAB, tiny_model

FACTORS = ("A_in", "B_in", "A_out", "B_out")


@dataclass
class LoRACase:
    num_experts: int
    top_k: int = 2
    activation: str = "swiglu"
    bias: bool = False
    capacity_factor: float = 0.0
    tokens_per_rank: list[int] | None = None  # default: 6 on every rank
    ranks_per_node: int | None = None
    rank: int = 2
    experts: list[int] | None = None  # the adapted experts (None: all)
    targets: tuple[str, ...] = ("w_in", "w_out")
    hot: bool = False  # a selection bias sends most tokens to expert 0 (rerouting moves rows)
    seed: int = 0
    plans: list[Plan] = field(default_factory=list)  # default: every valid plan and forced rerouting


def random_cases(world: int, count: int, seed: int) -> list[LoRACase]:
    """``count`` cases drawn from ``seed``: experts, top-k, activation, bias, capacity, adapted subset."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        E = world * rng.choice([1, 2])
        subset = sorted(rng.sample(range(E), rng.randint(1, E)))
        cases.append(
            LoRACase(
                num_experts=E,
                top_k=rng.randint(1, min(2, E)),
                activation=rng.choice(["swiglu", "gelu"]),
                bias=rng.random() < 0.3,
                capacity_factor=rng.choice([0.0, 1.0, 1.25]),
                tokens_per_rank=[rng.randint(0, 9) for _ in range(world)],
                ranks_per_node=rng.choice([None, 1]),
                rank=rng.choice([1, 2, 4]),
                experts=None if len(subset) == E else subset,
                targets=rng.choice([("w_in", "w_out"), ("w_in",), ("w_out",)]),
                hot=rng.random() < 0.5,
                seed=seed * 100 + i,
            )
        )
    return cases


def layers_for(case: LoRACase) -> tuple[MoELayer, MoELayer]:
    """The oracle with a trained-looking adapter, and the distributed layer holding the same."""
    torch.manual_seed(case.seed)
    router = RouterConfig(kind="sigmoid", selection_bias=True) if case.hot else "softmax"
    kwargs: dict[str, Any] = {
        "activation": case.activation,
        "bias": case.bias,
        "capacity_factor": case.capacity_factor,
        "router": router,
        "load_balance_weight": 0.0,
    }
    D, F, E, K = 16, 8, case.num_experts, case.top_k
    oracle = MoELayer(D, F, E, K, group=False, **kwargs)
    if case.hot:
        oracle.router.expert_bias_E.copy_(torch.tensor([100.0] + [0.0] * (E - 1)))
    layer = MoELayer(D, F, E, K, ranks_per_node=case.ranks_per_node, **kwargs)
    layer.load_single_device_state_dict(oracle.state_dict())
    settings = {"rank": case.rank, "alpha": 2.0 * case.rank, "experts": case.experts, "targets": case.targets}
    add_lora(oracle, **settings)
    add_lora(layer, **settings)
    with torch.no_grad():
        for p in oracle.experts.lora.parameters():  # type: ignore[union-attr]
            p.normal_(0.0, 0.3)  # B starts at zero: stand in for a trained adapter
    load_lora_state_dict(layer, lora_state_dict(oracle))
    return oracle, layer


def every_plan(layer: MoELayer) -> list[Plan]:
    plans = layer.valid_plans(degrees=(1, 2), exchanges=("flat", "2dh"))
    if layer.placement is not None and layer.placement.sharded:  # no rerouting of sharded experts
        return plans
    return plans + [Plan(reroute=kind, d=d) for kind in ("lla", "shadow") for d in (1, 2)]


def single_device_factor_grads(layer: MoELayer) -> dict[str, torch.Tensor | None]:
    """The gradients of ``layer``'s adapter factors, gathered into ``[E, ...]`` (a collective)."""
    local = layer.experts.lora
    assert local is not None
    out: dict[str, torch.Tensor | None] = {}
    for name in FACTORS:
        param = getattr(local, name)
        if param is None:
            out[name] = None
            continue
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        out[name] = layer.single_device_expert_rows([grad], FACTOR_SHARDS[name])[0]
    return out


def assert_near(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def check_lora_equivalence(rank: int, world: int, cases: list[LoRACase]) -> int:
    """Every case, every plan: outputs, input and LoRA-factor gradients equal the oracle's."""
    checked = 0
    for case in cases:
        checked += _check_case(rank, world, case)
    return checked


def _check_case(rank: int, world: int, case: LoRACase) -> int:
    oracle, layer = layers_for(case)
    tokens = case.tokens_per_rank or [6] * world
    start, T = sum(tokens[:rank]), tokens[rank]
    torch.manual_seed(1000 + case.seed)
    x_global, g_global = torch.randn(sum(tokens), 16), torch.randn(sum(tokens), 16)
    x_ref = x_global.clone().requires_grad_()
    y_ref = oracle(x_ref)
    torch.sum(y_ref * g_global).backward()
    adapter = oracle.experts.lora
    assert adapter is not None
    ids = list(adapter.experts)
    others = [e for e in range(case.num_experts) if e not in ids]
    plans = case.plans or every_plan(layer)
    copies = 0
    for plan in plans:
        layer.zero_grad(set_to_none=True)
        x = x_global[start : start + T].clone().requires_grad_()
        y = layer(x, plan=plan)
        torch.sum(y * g_global[start : start + T]).backward()
        where = f"rank {rank}, {case}, {plan}"
        assert_near(f"output ({where})", y, y_ref[start : start + T].detach())
        assert x.grad is not None and x_ref.grad is not None
        assert_near(f"input grad ({where})", x.grad, x_ref.grad[start : start + T])
        for name, full in single_device_factor_grads(layer).items():
            want = getattr(adapter, name)
            if full is None:
                assert want is None, where
                continue
            assert_near(f"lora.{name} grad ({where})", full[ids], want.grad)
            assert not full[others].any(), f"{where}: experts without an adapter got a gradient"
        assert all(p.grad is None for n, p in layer.named_parameters() if ".lora." not in n), where
        stats = layer.stats
        assert stats is not None
        copies += stats.expert_copies
    if case.hot and world > 1 and case.top_k == 1:
        assert copies > 0, f"rank {rank}, {case}: no plan moved an expert's copy"
    return len(plans)


def check_lora_training(rank: int, world: int, num_experts: int, moves: list[list[int]]) -> list[float]:
    """AdamW steps on the adapter equal the oracle's, with placements moved and replicas held between."""
    case = LoRACase(num_experts=num_experts, experts=[0, num_experts - 1], hot=True, seed=11, top_k=1)
    oracle, layer = layers_for(case)
    oracle_opt = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=0.05)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    tokens = [6] * world
    losses = []
    for step, placement in enumerate(moves):
        if placement:
            layer.apply_placement(placement, opt)  # the factors and their optimizer state move too
            layer.set_replicas([[0]] * world if step % 2 else None)
        torch.manual_seed(step)
        x_global = torch.randn(sum(tokens), 16)
        loss_ref = oracle(x_global).square().sum()
        loss_ref.backward()
        oracle_opt.step()
        oracle_opt.zero_grad()
        x = x_global[rank * 6 : rank * 6 + 6]
        loss = layer(x, plan=Plan(reroute="lla" if step % 2 else False)).square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    got, want = lora_state_dict(layer), lora_state_dict(oracle)
    assert got.keys() == want.keys()
    for key in want:
        assert_near(f"rank {rank}: {key} after training", got[key], want[key])
    return losses


PEFT_MODEL = "qwen3_moe"
PEFT_TARGETS = {  # flexmoe targets -> PEFT's target_parameters
    ("w_in", "w_out"): ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ("w_out",): ["mlp.experts.down_proj"],
}


def peft_input_ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def peft_tiny_model(num_experts: int) -> torch.nn.Module:
    """The unconverted model of the PEFT tests (the same weights on every rank and in the test)."""
    return tiny_model(PEFT_MODEL, num_experts=num_experts, num_experts_per_tok=min(3, num_experts))


def converted_model(num_experts: int, spread: bool) -> torch.nn.Module:
    """``peft_tiny_model`` converted: on one device, or its experts spread over the default group."""
    model = peft_tiny_model(num_experts)
    flexmoe.hf.convert(model, group=None if spread else False)
    return model


def logits_under_every_plan(model: torch.nn.Module) -> list[tuple[Plan, torch.Tensor]]:
    """The converted model's logits of ``peft_input_ids`` with every block under each plan in turn."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    out = []
    for plan in every_plan(layers[0]):
        for layer in layers:
            layer.plan = plan
        with torch.no_grad():
            out.append((plan, model(input_ids=peft_input_ids()).logits))
    for layer in layers:
        layer.plan = None
    return out


def train_alike(
    rank: int, world: int, single: torch.nn.Module, spread: torch.nn.Module, steps: int = 2
) -> None:
    """AdamW steps on the adapters: ``spread`` on this rank's batch, ``single`` on all of them.

    Each rank's loss is a mean over its tokens and the factors' gradients sum every rank's
    tokens, so the single-device model's loss is the sum of the ranks' losses; the trained
    adapters then agree (checked on the gathered factors).
    """
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01) for m in (single, spread)
    ]
    before = lora_state_dict(spread)
    for step in range(steps):
        batches = [
            torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(50 * step + r))
            for r in range(world)
        ]
        sum(single(input_ids=ids, labels=ids).loss for ids in batches).backward()
        spread(input_ids=batches[rank], labels=batches[rank]).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    got, want = lora_state_dict(spread), lora_state_dict(single)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"rank {rank}, trained {k}: {m}"
        )
        if not key.endswith("expert_ids"):
            assert not torch.equal(got[key], before[key]), f"rank {rank}: {key} did not train"


def check_peft_save(
    rank: int,
    world: int,
    directory: str,
    num_experts: int,
    experts: list[int] | None,
    targets: tuple[str, ...],
    move: bool,
) -> list[Any]:
    """``save_peft_adapter`` of a spread model, its adapter trained: rank 0 writes, the other ranks nothing.

    Rank 0 also saves the single-device model with the same adapter under ``single``;
    returns that model's logits (nested lists), which PEFT must reproduce from the files.
    """
    single, spread = converted_model(num_experts, False), converted_model(num_experts, True)
    settings: dict[str, Any] = {"rank": 4, "alpha": 8, "experts": experts, "targets": targets}
    add_lora(single, **settings)
    add_lora(spread, **settings)
    torch.manual_seed(7)  # the same trained-looking adapter on every rank
    with torch.no_grad():
        for adapter in lora_adapters(single).values():
            for p in adapter.parameters():
                p.normal_(0.0, 0.2)
    load_lora_state_dict(spread, lora_state_dict(single))
    layers = [m for m in spread.modules() if isinstance(m, MoELayer)]
    for layer in layers:  # sharded experts where they are fewer than the ranks
        assert layer.world_size == world and layer.placement is not None
        assert layer.placement.sharded == (num_experts < world)
    if move:  # experts (and their factors) in reversed slots: the files stay in logical order
        for layer in layers:
            layer.apply_placement(list(reversed(range(num_experts))))
    train_alike(rank, world, single, spread)
    load_lora_state_dict(single, lora_state_dict(spread))  # the very values, for the byte comparison
    with torch.no_grad():
        want = single(input_ids=peft_input_ids()).logits
    for plan, got in logits_under_every_plan(spread):
        assert_near(f"rank {rank}, logits under {plan}", got, want)

    merge_lora(spread)  # refused on every rank alike, before any collective
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_peft_adapter(spread, f"{directory}/merged")
    unmerge_lora(spread)

    assert save_peft_adapter(spread, f"{directory}/spread") == Path(f"{directory}/spread")
    mine = Path(f"{directory}/rank{rank}")
    assert save_peft_adapter(spread, mine) == mine
    assert mine.exists() == (rank == 0), f"rank {rank} wrote {mine}" if rank else "rank 0 wrote nothing"
    if rank == 0:
        save_peft_adapter(single, f"{directory}/single")
    return want.tolist()


def check_peft_load(rank: int, world: int, directory: str, num_experts: int, want: list[Any]) -> int:
    """``load_peft_adapter`` of PEFT's files into a spread model: every plan gives PEFT's logits ``want``.

    Each rank's factors equal the single-device model's loaded from the same files
    (gathered back exactly); the spread model then saves the files PEFT wrote, under ``again``.
    """
    single, spread = converted_model(num_experts, False), converted_model(num_experts, True)
    expected = load_peft_adapter(single, directory)
    adapters = load_peft_adapter(spread, directory)
    assert adapters.keys() == expected.keys()
    for path, adapter in adapters.items():
        assert adapter.targets == expected[path].targets
        assert adapter.adapted_experts == expected[path].experts
    trainable = {name for name, p in spread.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in name for name in trainable), trainable
    got_state, want_state = lora_state_dict(spread), lora_state_dict(single)
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), f"rank {rank}: {key}"
    peft_logits = torch.tensor(want)
    with torch.no_grad():
        torch.testing.assert_close(
            single(input_ids=peft_input_ids()).logits, peft_logits, rtol=1e-4, atol=1e-4
        )
    checked = logits_under_every_plan(spread)
    for plan, got in checked:
        torch.testing.assert_close(got, peft_logits, rtol=1e-4, atol=1e-4, msg=lambda m, p=plan: f"{p}: {m}")
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        load_peft_adapter(spread, directory)
    save_peft_adapter(spread, f"{directory}/again")
    return len(checked)


def checkpoint_model(
    seed: int, num_experts: int = 4, experts: tuple[int, ...] = (0, 3)
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A block with an adapter on ``experts`` and its AdamW; seed 0: the same on any world size."""
    torch.manual_seed(123)
    oracle = MoELayer(16, 8, num_experts, 1, group=False)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), MoELayer(16, 8, num_experts, 1))
    if seed == 0:
        model[1].load_single_device_state_dict(oracle.state_dict())
    add_lora(oracle, rank=2, alpha=4, experts=list(experts))
    add_lora(model, rank=2, alpha=4, experts=list(experts))
    torch.manual_seed(321 + seed)  # the layers above drew per-rank numbers of values
    with torch.no_grad():
        for p in oracle.experts.lora.parameters():  # type: ignore[union-attr]
            p.normal_(0.0, 0.3)
    state = {f"1.{key}": value for key, value in lora_state_dict(oracle).items()}
    load_lora_state_dict(model, state)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    return model, optimizer


def checkpoint_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int, world: int
) -> None:
    torch.manual_seed(500 + step)
    x_global = torch.randn(12, 16)
    x = x_global.chunk(world)[rank]
    model(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def lora_checkpoint_run(
    rank: int, world: int, directory: str, mode: str, num_experts: int = 4, experts: tuple[int, ...] = (0, 3)
) -> dict[str, Any]:
    """``save``: step 1, checkpoint, step 2; ``load``: load the checkpoint, step 2. The adapter after step 2.

    The base (another seed on each side) comes from the checkpoint too. Returned as
    nested lists (tensors would not survive the worker's exit in the result queue).
    """
    model, optimizer = checkpoint_model(0 if mode == "save" else 7, num_experts, experts)
    if mode == "save":
        checkpoint_step(model, optimizer, 1, rank, world)
        save_checkpoint(directory, model, optimizer, step=1)
    else:
        load_checkpoint(directory, model, optimizer)
    checkpoint_step(model, optimizer, 2, rank, world)
    return {key: value.tolist() for key, value in lora_state_dict(model).items()}


def check_lora_checkpoint_refusal(
    rank: int, world: int, directory: str, num_experts: int = 4, experts: tuple[int, ...] = (1, 2)
) -> str:
    """A checkpoint of an adapter on other experts (default: 0 and 3) refuses a model adapting ``experts``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), MoELayer(16, 8, num_experts, 1))
    add_lora(model, rank=2, alpha=4, experts=list(experts))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(directory, model)
    return str(refused.value)


def check_lora_inference(rank: int, world: int, num_experts: int | None = None) -> int:
    """Without autograd, unmerged then merged: every plan equals the oracle (default ``2 W`` experts)."""
    E = 2 * world if num_experts is None else num_experts
    oracle, layer = layers_for(LoRACase(num_experts=E, top_k=min(2, E), experts=[0, E - 1], seed=5))
    oracle.eval()
    layer.eval()
    torch.manual_seed(9)
    x_global = torch.randn(6 * world, 16)
    mine = x_global.chunk(world)[rank]
    plans = every_plan(layer)
    with torch.no_grad():
        want = oracle(x_global).chunk(world)[rank]
        for plan in plans:
            assert_near(f"rank {rank}, unmerged, {plan}", layer(mine, plan=plan), want)
        merge_lora(layer)
        for plan in plans:
            torch.testing.assert_close(layer(mine, plan=plan), want, rtol=1e-4, atol=1e-5)
        unmerge_lora(layer)
        torch.testing.assert_close(layer(mine, plan=plans[-1]), want, rtol=1e-4, atol=1e-5)
    return 2 * len(plans)
