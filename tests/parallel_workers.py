"""Worker functions for the multi-process tests (importable by spawned processes).

Each equivalence case builds a single-device ``MoELayer`` (the oracle) and a
distributed one holding the same global weights, runs the global batch through the
oracle and each rank's slice through the distributed layer under every plan, and
compares outputs and gradients (input, every stored expert slice, router).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan, RerouteConfig, RouterConfig
from flexmoe.parallel.comm import exchange


@dataclass
class Case:
    num_experts: int
    top_k: int = 2
    dim: int = 16
    hidden_dim: int = 8
    activation: str = "swiglu"
    bias: bool = False
    capacity_factor: float = 0.0
    batch_prioritized: bool = False
    tokens_per_rank: list[int] | None = None  # default: 6 on every rank
    ranks_per_node: int | None = None
    load_balance_weight: float = 0.01
    router: str = "softmax"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    skew: str | None = None  # "one": every token picks expert 0 first; "zipf"; "never": last expert unused
    rerouting: RerouteConfig | None = None
    plans: list[Plan | str] = field(default_factory=list)  # default: every valid plan; "auto": the tuner
    compiled: bool = False  # call the distributed layer through torch.compile
    top_p: float | None = None  # top-p routing: a per-token number of experts
    zero_experts: tuple[str, ...] = ()  # zero-computation experts next to the routed ones


def all_plans(layer: MoELayer) -> list[Plan]:
    """Every valid ``(r, d, exchange)`` of a distributed layer, ``d`` in {1, 2, 4}."""
    assert layer.world_size > 1
    plans = layer.valid_plans(degrees=(1, 2, 4), exchanges=("flat", "2dh"))
    return plans


def _close(name: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: float = 1e-5) -> None:
    if want is None or got is None:
        assert (
            (got is None and want is None)
            or (got is not None and not got.any())
            or (want is not None and not want.any())
        ), f"{name}: one gradient missing (got {got is not None}, want {want is not None})"
        return
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


class _Block(torch.nn.Module):
    """A residual block around an MoE layer, as a transformer calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.moe = MoELayer(16, 8, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))


def check_compiled_graph(rank: int, world: int) -> list[str]:
    """Where ``torch._dynamo.explain`` breaks the graph of two blocks around distributed layers."""
    torch.manual_seed(0)
    first, second = _Block(), _Block()
    explained = torch._dynamo.explain(lambda x: second(first(x)))(torch.randn(5, 16))
    return [f"{b.user_stack[-1].name}: {b.reason.splitlines()[0]}" for b in explained.break_reasons]


def check_equivalence(rank: int, world: int, cases: list[Case]) -> int:
    """Every case, every plan: outputs and gradients equal the single-device layer's."""
    checked = 0
    for case in cases:
        checked += _check_case(rank, world, case)
    return checked


def _case_layers(case: Case) -> tuple[MoELayer, MoELayer]:
    """The case's single-device oracle (skew applied) and a distributed layer (not loaded)."""
    torch.manual_seed(case.seed)
    kwargs: dict[str, Any] = {
        "activation": case.activation,
        "bias": case.bias,
        "capacity_factor": case.capacity_factor,
        "batch_prioritized": case.batch_prioritized,
        "load_balance_weight": case.load_balance_weight,
        "router": case.router,
        "rerouting": case.rerouting,
    }
    D, E, K = case.dim, case.num_experts, case.top_k
    if case.skew is not None:
        kwargs["router"] = RouterConfig(kind="sigmoid", selection_bias=True, top_p=case.top_p)
    elif case.top_p is not None:
        kwargs["router"] = RouterConfig(kind=case.router, top_p=case.top_p)  # type: ignore[arg-type]
    kwargs["zero_experts"] = case.zero_experts
    oracle = MoELayer(D, case.hidden_dim, E, K, group=False, **kwargs)
    if case.skew is not None:
        # The selection bias steers the choice only (weights stay the sigmoid scores).
        bias = {
            "one": torch.tensor([100.0] + [0.0] * (E - 1)),
            "zipf": 4.0 * -torch.log(torch.arange(1, E + 1, dtype=torch.float32)) * 1.2,
            "never": torch.tensor([0.0] * (E - 1) + [-100.0]),
        }[case.skew]
        zero = torch.zeros(len(case.zero_experts))  # zero-computation experts: no extra bias
        oracle.router.expert_bias_E.copy_(torch.cat([bias, zero]))
    if oracle.zero_constants is not None:  # nonzero, so that a wrong one shows
        with torch.no_grad():
            oracle.zero_constants.normal_()
    layer = MoELayer(D, case.hidden_dim, E, K, ranks_per_node=case.ranks_per_node, **kwargs)
    return oracle, layer


def _check_case(rank: int, world: int, case: Case) -> int:
    oracle, layer = _case_layers(case)
    D = case.dim
    layer.load_single_device_state_dict(oracle.state_dict())
    oracle.to(case.dtype)
    layer.to(case.dtype)
    tol = 1e-5 if case.dtype == torch.float32 else 3e-2
    tokens = case.tokens_per_rank or [6] * world
    start, T = sum(tokens[:rank]), tokens[rank]
    x_global = torch.randn(sum(tokens), D).to(case.dtype)
    g_global = torch.randn(sum(tokens), D).to(case.dtype)
    x_ref = x_global.clone().requires_grad_()
    y_ref = oracle(x_ref)
    (torch.sum(y_ref * g_global) + oracle.aux_loss).backward()
    assert oracle.stats is not None
    ptrs = {name: p.data_ptr() for name, p in layer.named_parameters()}
    plans = case.plans or all_plans(layer)
    run = torch.compile(layer, backend="aot_eager") if case.compiled else layer
    for plan in plans:
        layer.zero_grad(set_to_none=True)
        x = x_global[start : start + T].clone().requires_grad_()
        y = run(x, plan=plan)
        # Mean over ranks of the per-rank aux losses is the global-batch loss.
        (torch.sum(y * g_global[start : start + T]) + layer.aux_loss / world).backward()
        where = f"rank {rank}, {case}, {plan}"
        _close(f"output ({where})", y, y_ref[start : start + T].detach(), tol)
        assert x.grad is not None and x_ref.grad is not None
        _close(f"input grad ({where})", x.grad, x_ref.grad[start : start + T], tol)
        grads = layer.single_device_expert_grads()
        for name in ("w_in", "w_out", "b_in", "b_out"):
            ref_param = getattr(oracle.experts, name)
            want = None if ref_param is None else ref_param.grad
            _close(f"experts.{name} grad ({where})", grads.get(f"experts.{name}"), want, tol)
        for name, param in layer.router.named_parameters():
            grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)
            want_router = dict(oracle.router.named_parameters())[name].grad
            _close(f"router.{name} grad ({where})", grad, want_router, tol)
        if layer.zero_constants is not None:  # replicated, like the router: the ranks' sum
            assert layer.zero_constants.grad is not None and oracle.zero_constants is not None
            grad = layer.zero_constants.grad.clone()
            dist.all_reduce(grad)
            _close(f"zero_constants grad ({where})", grad, oracle.zero_constants.grad, tol)
        stats = layer.stats
        assert stats is not None
        # The whole batch's experts per token and zero-expert choices, as on one device.
        assert stats.experts_per_token is not None and oracle.stats.experts_per_token is not None
        assert torch.equal(stats.experts_per_token, oracle.stats.experts_per_token), where
        want_zero = oracle.stats.zero_expert_choices
        assert (stats.zero_expert_choices is None) == (want_zero is None), where
        assert want_zero is None or torch.equal(stats.zero_expert_choices, want_zero), where
        assert torch.equal(stats.routed_per_expert, oracle.stats.routed_per_expert), where
        assert torch.equal(stats.tokens_per_expert, oracle.stats.tokens_per_expert), where
        assert stats.dropped == oracle.stats.dropped, where
        assert stats.capacity == oracle.stats.capacity, where
        assert stats.num_tokens == oracle.stats.num_tokens, where
        assert stats.load_max_over_mean == pytest.approx(oracle.stats.load_max_over_mean, rel=1e-12), where
        assert stats.world_size == world and stats.plan.r is not None, where
        assert bool(stats.plan.reroute) == (stats.expert_copies > 0), where
        assert (stats.plan.reroute == "shadow") == bool(stats.shadowed_experts), where
        if isinstance(plan, str):  # "auto": every rank took the same decision
            decisions: list[Any] = [None] * world
            assert stats.tuner is not None, where
            dist.all_gather_object(decisions, (stats.tuner.plan, stats.tuner.phase, stats.tuner.bucket))
            assert all(d == decisions[0] for d in decisions), (where, decisions)
            assert bool(stats.plan.reroute) == bool(stats.tuner.plan.reroute), where
            assert {name: p.data_ptr() for name, p in layer.named_parameters()} == ptrs, where
            continue
        if plan.reroute and case.skew == "one" and case.top_k == 1:
            assert stats.plan.reroute and stats.rerouted_rows > 0, where  # everything on one rank
            if plan.reroute == "shadow":  # every rank computes its own rows of expert 0
                assert stats.shadowed_experts == [0], where
        if plan.reroute is False:
            assert not stats.plan.reroute, where
        if stats.rows_per_rank is not None:
            assert sum(stats.rows_per_rank) == int(oracle.stats.tokens_per_expert.sum()), where
            _check_bounds(stats, case, where)
        # Switching plans moved no stored parameter.
        assert {name: p.data_ptr() for name, p in layer.named_parameters()} == ptrs, where
    return len(plans)


def _check_bounds(stats: Any, case: Case, where: str) -> None:
    """A rerouted step kept the memory bounds: rows per rank and expert copies per rank."""
    bounds = case.rerouting or RerouteConfig()
    if stats.plan.reroute and bounds.max_rows_per_rank is not None:
        assert max(stats.rows_per_rank) <= bounds.max_rows_per_rank, where
    if stats.plan.reroute and bounds.max_copies_per_rank is not None:
        assert stats.copies_per_rank is not None
        assert max(stats.copies_per_rank) <= bounds.max_copies_per_rank, where


def check_exchange(rank: int, world: int, node_sizes: list[int]) -> None:
    """2DH equals the flat all-to-all for random (also empty) message sizes."""
    for seed, ranks_per_node in enumerate(node_sizes):
        _check_exchange(rank, world, ranks_per_node, seed)


def _check_exchange(rank: int, world: int, ranks_per_node: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randint(0, 4, (world, world), generator=generator).tolist()
    matrix[0][world - 1] = 0
    rows = sum(matrix[rank])
    x = torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) + 1000 * rank
    flat = exchange(x, matrix, rank, "flat", ranks_per_node, None)
    hier = exchange(x, matrix, rank, "2dh", ranks_per_node, None)
    assert torch.equal(flat, hier), (rank, matrix)
    # And the flat result really is the sources' rows, in source order.
    expected = []
    for q in range(world):
        offset = sum(matrix[q][:rank])
        expected.append(
            torch.arange(offset, offset + matrix[q][rank]).repeat_interleave(3).view(-1, 3) * 3
            + torch.arange(3)
            + 1000 * q
        )
    torch.testing.assert_close(flat, torch.cat(expected).float())


def check_mismatch(rank: int, world: int, what: str) -> str:
    """A setting that differs between ranks raises on every rank (returns the message)."""
    num_experts = 4 if what != "num_experts" or rank == 0 else 8
    dim = 16 if what != "dim" or rank == 0 else 32
    try:
        layer = MoELayer(dim, 8, num_experts, 2, timeout=30)
        plan = Plan(d=2 if what == "plan" and rank == 1 else 1)
        top_k = 1 if what == "top_k" and rank == 1 else 2
        layer(torch.randn(5, dim), plan=plan, top_k=top_k)
    except RuntimeError as error:
        return str(error)
    raise AssertionError(f"rank {rank}: no error for a mismatched {what}")


def check_bad_input(rank: int, world: int, what: str) -> str:
    """One rank's bad input: it raises its own error, the others raise instead of waiting."""
    layer = MoELayer(16, 8, 4, 2, timeout=30, check_finite=True)
    x = torch.randn(5, 16)
    if rank == 1:
        x = {"dim": torch.randn(5, 12), "nan": x.index_fill(0, torch.tensor([2]), float("nan"))}[what]
    try:
        layer(x)
    except (RuntimeError, ValueError) as error:
        message = f"{type(error).__name__}: {error}"
    else:
        raise AssertionError(f"rank {rank}: no error")
    layer(torch.randn(3, 16))  # the next step runs normally on every rank
    return message


def check_timeout(rank: int, world: int) -> str:
    """A rank that never joins a step: the others raise a timeout naming the layer and the step."""
    layer = MoELayer(16, 8, 4, 2, timeout=2.0)
    layer.name = "blocks.3.moe"
    layer(torch.randn(4, 16))  # step 0 completes on both ranks
    if rank == 1:
        time.sleep(6.0)  # skip step 1 (longer than the timeout), then leave
        return ""
    from flexmoe.parallel import CollectiveTimeoutError

    start = time.perf_counter()
    try:
        layer(torch.randn(4, 16))
    except CollectiveTimeoutError as error:
        assert time.perf_counter() - start < 10.0
        return str(error)
    raise AssertionError("rank 0: no timeout")


class _Model(torch.nn.Module):
    def __init__(self, group: Any) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.moe = MoELayer(16, 8, 4, 2, group=group, load_balance_weight=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(torch.tanh(self.inp(x)))  # type: ignore[no-any-return]


def check_ddp(rank: int, world: int) -> None:
    """DDP around a model with an expert-parallel layer: with expert parameters ignored by
    DDP and scaled by 1/W, every gradient equals the single-device gradient of the mean
    loss over the global batch."""
    from torch.nn.parallel import DistributedDataParallel

    from flexmoe.parallel import ddp_ignore_expert_parameters, is_expert_parameter, scale_expert_gradients

    torch.manual_seed(0)
    oracle = _Model(group=False)
    model = _Model(group=None)
    model.inp.load_state_dict(oracle.inp.state_dict())
    model.moe.load_single_device_state_dict(oracle.moe.state_dict())
    ignored = ddp_ignore_expert_parameters(model)
    assert sorted(ignored) == ["moe.experts.w_in", "moe.experts.w_out"], ignored
    assert not any(is_expert_parameter(p) for p in model.inp.parameters())
    ddp = DistributedDataParallel(model)
    T = 6
    x_global, target = torch.randn(world * T, 16), torch.randn(world * T, 16)
    (torch.nn.functional.mse_loss(oracle(x_global), target) + oracle.moe.aux_loss).backward()
    for _ in range(2):  # a second step reuses DDP's buckets
        ddp.zero_grad(set_to_none=True)
        x, y = x_global[rank * T : (rank + 1) * T], target[rank * T : (rank + 1) * T]
        (torch.nn.functional.mse_loss(ddp(x), y) + model.moe.aux_loss).backward()
        scale_expert_gradients(model)
        expert_grads = model.moe.single_device_expert_grads()
        for name, param in model.named_parameters():
            want = dict(oracle.named_parameters())[name].grad
            got = expert_grads[name.removeprefix("moe.")] if name.startswith("moe.experts.") else param.grad
            assert want is not None and got is not None, name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# A layer with top-p routing, zero-computation experts (a constant one: a parameter) and a
# selection bias moved by the aux-loss-free rule: what a checkpoint must carry beyond experts.
ADAPTIVE_ROUTING: dict[str, Any] = {
    "router": RouterConfig(top_p=0.6, selection_bias=True),
    "zero_experts": ("skip", "constant"),
    "aux_free_rate": 0.05,
}


def checkpoint_model(
    num_experts: int = 4, bias: bool = False, group: Any = False, adaptive: bool = False
) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
    """A small model with one MoE layer (``adaptive``: with ``ADAPTIVE_ROUTING``), and its AdamW."""
    extra = ADAPTIVE_ROUTING if adaptive else {}
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), MoELayer(16, 8, num_experts, 2, bias=bias, group=group, **extra)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def checkpoint_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> float:
    """One AdamW step of ``checkpoint_model`` on seeded data; returns the loss."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y) + model[1].aux_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model[1].update_expert_bias()  # aux-loss-free balancing (does nothing without it)
    return float(loss.detach())


def checkpoint_reshard_step(
    rank: int,
    world: int,
    load_from: str,
    save_to: str,
    seed: int,
    num_experts: int = 4,
    bias: bool = False,
    adaptive: bool = False,
) -> float:
    """Load a checkpoint written at another world size, train one step on the global batch
    (this rank's share), save; returns the global loss."""
    from flexmoe.checkpoint import load_checkpoint, save_checkpoint
    from flexmoe.parallel import scale_expert_gradients

    torch.manual_seed(100 + rank)  # anything: the checkpoint overwrites it
    model, optimizer = checkpoint_model(num_experts=num_experts, bias=bias, group=None, adaptive=adaptive)
    if adaptive:  # a fresh layer's selection bias and constants differ from the checkpoint's
        with torch.no_grad():
            model[1].router.expert_bias_E.uniform_()
            model[1].zero_constants.uniform_()
    load_checkpoint(load_from, model, optimizer)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    T = 12 // world
    xs, ys = x[rank * T : (rank + 1) * T], y[rank * T : (rank + 1) * T]
    # The global loss is the mean over ranks of the per-rank means (equal shares).
    loss = torch.nn.functional.mse_loss(model(xs), ys) + model[1].aux_loss
    optimizer.zero_grad()
    loss.backward()
    for p in model[0].parameters():  # data-parallel parameters: average over ranks
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= world
    replicated = [*model[1].router.parameters()]
    if model[1].zero_constants is not None:
        replicated.append(model[1].zero_constants)
    for p in replicated:
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= world
    scale_expert_gradients(model)
    optimizer.step()
    model[1].update_expert_bias()  # from the whole batch's counts: the same on every rank
    save_checkpoint(save_to, model, optimizer, step=seed)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def check_failures(rank: int, world: int) -> dict[str, str]:
    """Every failure case in turn on the same processes (each must leave the group usable)."""
    messages = {what: check_mismatch(rank, world, what) for what in ("num_experts", "dim", "plan", "top_k")}
    for what in ("dim", "nan"):
        messages[f"input {what}"] = check_bad_input(rank, world, what)
    return messages


def check_eight_ranks(rank: int, world: int, node_sizes: list[int], cases: list[Case]) -> int:
    """The exchange check and the equivalence cases on one set of processes."""
    check_exchange(rank, world, node_sizes)
    return check_equivalence(rank, world, cases)


def run_tuner(rank: int, world: int, num_experts: int, schedule: list[str], tuner: Any) -> list[Any]:
    """Training steps of one layer with ``plan="auto"`` under a schedule of skews.

    ``schedule[i]``: the routing of step ``i`` (``"uniform"`` or ``"one"``: every token
    chooses experts 0 and 1, both on rank 0). Returns, per step, ``(phase, plan, bucket, predicted_s,
    previous_s)`` of ``layer.stats.tuner`` (every rank's must agree: checked here).
    """
    torch.manual_seed(0)
    E = num_experts
    layer = MoELayer(
        32, 64, E, 2, router=RouterConfig(kind="sigmoid", selection_bias=True), plan="auto", tuner=tuner
    )
    out = []
    for step, skew in enumerate(schedule):
        bias = torch.tensor([100.0, 100.0] + [0.0] * (E - 2)) if skew == "one" else torch.zeros(E)
        layer.router.expert_bias_E.copy_(bias)
        torch.manual_seed(1000 * step + rank)
        x = torch.randn(64, 32, requires_grad=True)
        layer(x).square().mean().backward()
        assert layer.stats is not None and layer.stats.tuner is not None
        d = layer.stats.tuner
        row = (d.phase, d.plan, d.bucket, d.predicted_s, d.previous_s)
        rows: list[Any] = [None] * world
        dist.all_gather_object(rows, row)
        assert all(r == rows[0] for r in rows), rows
        out.append(row)
    return out


# --------------------------------------------------------------------------- placement
def _placed_layers(case: Case, placement: list[int], before_load: bool) -> tuple[MoELayer, MoELayer]:
    """A single-device oracle and a distributed layer with the same global weights, placed."""
    oracle, layer = _case_layers(case)
    E = case.num_experts
    if before_load:  # place the (random) weights, then load: each rank keeps its placed slots
        layer.apply_placement(placement)
        layer.load_single_device_state_dict(oracle.state_dict())
    else:  # load, then move the loaded weights
        layer.load_single_device_state_dict(oracle.state_dict())
        report = layer.apply_placement(placement)
        El = E // dist.get_world_size()
        moved = sum(1 for e, s in enumerate(placement) if s // El != e // El)
        assert report.experts_moved == moved, (report, placement)
    assert layer.expert_placement == placement
    return oracle, layer


def check_placed_equivalence(rank: int, world: int, cases: list[tuple[Case, list[int], bool]]) -> int:
    """Under a non-identity placement, every listed plan: outputs, gradients, stats and the
    gathered state dict equal the single-device layer's."""
    checked = 0
    for case, placement, before_load in cases:
        oracle, layer = _placed_layers(case, placement, before_load)
        stored = layer.stored_experts
        El = case.num_experts // world
        assert sorted(stored) == sorted(e for e, s in enumerate(placement) if s // El == rank)
        full = layer.single_device_state_dict()
        for key, value in oracle.state_dict().items():
            torch.testing.assert_close(full[key], value, rtol=0, atol=0, msg=key)
        tokens = case.tokens_per_rank or [6] * world
        start, T = sum(tokens[:rank]), tokens[rank]
        x_global, g_global = torch.randn(sum(tokens), case.dim), torch.randn(sum(tokens), case.dim)
        x_ref = x_global.clone().requires_grad_()
        y_ref = oracle(x_ref)
        (torch.sum(y_ref * g_global) + oracle.aux_loss).backward()
        assert oracle.stats is not None and x_ref.grad is not None
        for plan in case.plans:
            layer.zero_grad(set_to_none=True)
            x = x_global[start : start + T].clone().requires_grad_()
            y = layer(x, plan=plan)
            (torch.sum(y * g_global[start : start + T]) + layer.aux_loss / world).backward()
            where = f"rank {rank}, {case}, placement {placement}, {plan}"
            _close(f"output ({where})", y, y_ref[start : start + T].detach())
            assert x.grad is not None
            _close(f"input grad ({where})", x.grad, x_ref.grad[start : start + T])
            for name in ("w_in", "w_out", "b_in", "b_out"):
                param, ref = getattr(layer.experts, name), getattr(oracle.experts, name)
                if param is None:
                    continue
                _close(f"experts.{name} grad ({where})", param.grad, ref.grad[stored])
            for name, param in layer.router.named_parameters():
                grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
                dist.all_reduce(grad)
                _close(
                    f"router.{name} grad ({where})", grad, dict(oracle.router.named_parameters())[name].grad
                )
            stats = layer.stats
            assert stats is not None
            assert torch.equal(stats.routed_per_expert, oracle.stats.routed_per_expert), where
            assert torch.equal(stats.tokens_per_expert, oracle.stats.tokens_per_expert), where
            assert (stats.dropped, stats.capacity) == (oracle.stats.dropped, oracle.stats.capacity), where
            if stats.rows_per_rank is not None:
                kept = oracle.stats.tokens_per_expert.tolist()
                native = [sum(kept[e] for e, s in enumerate(placement) if s // El == p) for p in range(world)]
                assert stats.native_rows_per_rank == native, where  # rows go where the placement says
                _check_bounds(stats, case, where)
            checked += 1
    return checked


class _PlacedModel(torch.nn.Module):
    def __init__(self, num_experts: int, group: Any) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.moe = MoELayer(16, 8, num_experts, 2, bias=True, group=group, capacity_factor=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(torch.tanh(self.inp(x)))  # type: ignore[no-any-return]


def _placed_training(
    rank: int, world: int, num_experts: int, steps: int, moves: dict[int, list[int]], with_optimizer: bool
) -> tuple[list[float], dict[str, torch.Tensor], list[Any]]:
    """Train a distributed model on every rank's share of a fixed global batch stream;
    at step ``s`` in ``moves``, after backward and before the optimizer step, apply
    ``moves[s]`` (the gradients, weights and AdamW moments move). Returns the global
    losses, the gathered single-device state and the move reports."""
    from flexmoe.parallel import scale_expert_gradients

    torch.manual_seed(0)
    reference = _PlacedModel(num_experts, group=False)  # the oracle's initial weights
    model = _PlacedModel(num_experts, group=None)
    model.inp.load_state_dict(reference.inp.state_dict())
    model.moe.load_single_device_state_dict(reference.moe.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    T = 24 // world
    losses, reports = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, target = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
        xs, ys = x[rank * T : (rank + 1) * T], target[rank * T : (rank + 1) * T]
        loss = torch.nn.functional.mse_loss(model(xs), ys) + model.moe.aux_loss
        optimizer.zero_grad()
        loss.backward()
        for p in [*model.inp.parameters(), *model.moe.router.parameters()]:
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        scale_expert_gradients(model)
        if step in moves:
            reports.append(model.moe.apply_placement(moves[step], optimizer if with_optimizer else None))
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses, model.moe.single_device_state_dict() | {"inp": model.inp.weight.detach()}, reports


def check_placement_training(rank: int, world: int, num_experts: int, moves: dict[int, list[int]]) -> Any:
    """Training with placement changes mid-way equals training without them and the single
    device (losses and weights); moving without the optimizer's state does not."""
    steps = max(moves) + 3
    torch.manual_seed(0)
    oracle = _PlacedModel(num_experts, group=False)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=1e-2)
    oracle_losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + step)
        x, target = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
        loss = torch.nn.functional.mse_loss(oracle(x), target) + oracle.moe.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        oracle_losses.append(float(loss.detach()))
    oracle_state = oracle.moe.state_dict() | {"inp": oracle.inp.weight.detach()}
    plain_losses, plain_state, _ = _placed_training(rank, world, num_experts, steps, {}, True)
    moved_losses, moved_state, reports = _placed_training(rank, world, num_experts, steps, moves, True)
    _, lost_state, _ = _placed_training(rank, world, num_experts, steps, moves, False)
    torch.testing.assert_close(moved_losses, plain_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved_losses, oracle_losses, rtol=1e-5, atol=1e-6)
    for key, want in oracle_state.items():
        torch.testing.assert_close(plain_state[key], want, rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(moved_state[key], want, rtol=1e-4, atol=1e-5, msg=key)
    # Moving the weights without their AdamW moments changes training: the test can fail.
    diverged = max(float((lost_state[k] - oracle_state[k]).abs().max()) for k in oracle_state)
    assert diverged > 1e-3, diverged
    return [dataclasses.asdict(r) for r in reports]


def checkpoint_placed_step(
    rank: int,
    world: int,
    load_from: str,
    save_to: str,
    seed: int,
    load_placement: list[int],
    save_placement: list[int],
) -> float:
    """``checkpoint_reshard_step`` with placements: placed before loading, re-placed
    (with the optimizer's state) before saving."""
    from flexmoe.checkpoint import load_checkpoint, save_checkpoint
    from flexmoe.parallel import scale_expert_gradients

    torch.manual_seed(100 + rank)
    model, optimizer = checkpoint_model(num_experts=len(load_placement), bias=True, group=None)
    model[1].apply_placement(load_placement)
    load_checkpoint(load_from, model, optimizer)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    T = 12 // world
    loss = torch.nn.functional.mse_loss(model(x[rank * T : (rank + 1) * T]), y[rank * T : (rank + 1) * T])
    loss = loss + model[1].aux_loss
    optimizer.zero_grad()
    loss.backward()
    for p in [*model[0].parameters(), *model[1].router.parameters()]:
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad /= world
    scale_expert_gradients(model)
    optimizer.step()
    model[1].apply_placement(save_placement, optimizer)
    save_checkpoint(save_to, model, optimizer, step=seed)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def check_placement_suite(
    rank: int,
    world: int,
    cases: list[tuple[Case, list[int], bool]],
    training: tuple[int, dict[int, list[int]]],
    checkpoint: tuple[str, str, int, list[int], list[int]],
) -> tuple[int, Any, float]:
    """The placement checks on one set of processes: equivalence, training, checkpoints."""
    checked = check_placed_equivalence(rank, world, cases)
    reports = check_placement_training(rank, world, *training)
    loss = checkpoint_placed_step(rank, world, *checkpoint)
    return checked, reports, loss


def check_rebalancer(rank: int, world: int) -> list[list[int]]:
    """A ``Rebalancer`` separates a skewed layer's hot experts (0 and 1, both on rank 0)
    while training, and the trained weights equal the single device's. Returns the
    layer's placement after each step."""
    from flexmoe.parallel import scale_expert_gradients
    from flexmoe.tools.rebalance import Rebalancer

    router = RouterConfig(kind="sigmoid", selection_bias=True)
    torch.manual_seed(0)
    oracle = MoELayer(16, 8, 4, 2, router=router, group=False)
    oracle.router.expert_bias_E.copy_(torch.tensor([3.0, 3.0, 0.0, 0.0]))
    layer = MoELayer(16, 8, 4, 2, router=router)
    layer.load_single_device_state_dict(oracle.state_dict())
    models = {"oracle": oracle, "layer": layer}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-2) for name, m in models.items()}
    # A horizon long enough that separating the hot experts pays whatever this machine is.
    rebalancer = Rebalancer(layer, optimizers["layer"], every=2, horizon_steps=10**9)
    placements = []
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8 * world, 16, generator=g)
        for name, model in models.items():
            xs = x if name == "oracle" else x[rank * 8 : (rank + 1) * 8]
            loss = model(xs).square().mean() + model.aux_loss
            optimizers[name].zero_grad()
            loss.backward()
        for p in layer.router.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        scale_expert_gradients(layer)
        for optimizer in optimizers.values():
            optimizer.step()
        rebalancer.step()
        placements.append(layer.expert_placement)
    for key, want in oracle.state_dict().items():
        torch.testing.assert_close(layer.single_device_state_dict()[key], want, rtol=1e-4, atol=1e-5, msg=key)
    assert rebalancer.reports and rebalancer.reports[0][0] == 2, rebalancer.reports
    return placements


def check_replicas(rank: int, world: int) -> list[tuple[int, int]]:
    """Persistent replicas under extreme skew: the layer equals the single device in
    inference and training; a replica serves without a transfer while the owner's weights
    are unchanged and is refreshed after they change. Returns ``(copies sent, replica
    hits)`` per call."""
    from flexmoe.planner.placement import replica_placement

    torch.manual_seed(0)
    E = 2 * world
    router = RouterConfig(kind="sigmoid", selection_bias=True)
    bias = torch.tensor([100.0] + [0.0] * (E - 1))  # every token's first choice: expert 0 (rank 0)
    oracle = MoELayer(16, 8, E, 2, router=router, group=False)
    oracle.router.expert_bias_E.copy_(bias)
    rc = RerouteConfig(max_copies_per_rank=1)
    layer = MoELayer(16, 8, E, 2, router=router, rerouting=rc)
    layer.load_single_device_state_dict(oracle.state_dict())
    loads = [float(c) for c in [world * 24.0] + [24.0 * world / (E - 1)] * (E - 1)]
    replicas = replica_placement(loads, layer.expert_placement, world, per_rank=1)
    assert all(0 in replicas[p] for p in range(1, world)), replicas  # the hot expert, everywhere
    try:
        layer.set_replicas([[1, 2]] + [[]] * (world - 1))
        raise AssertionError("two replicas on a rank with max_copies_per_rank=1 were accepted")
    except ValueError as error:
        assert "max_copies_per_rank=1" in str(error), error
    layer.set_replicas(replicas)
    assert layer.replicas == replicas
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (oracle, layer)]
    log = []

    def infer(step: int) -> None:
        x = torch.randn(24 * world, 16, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            want = oracle(x)[rank * 24 : (rank + 1) * 24]
            got = layer(x[rank * 24 : (rank + 1) * 24], plan=Plan(reroute=True))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert layer.stats is not None and layer.stats.plan.reroute
        assert max(layer.stats.copies_per_rank or [0]) <= 1  # the memory bound, replicas included
        log.append((layer.stats.expert_copies, layer.stats.replica_hits))

    def train(step: int) -> None:
        x = torch.randn(24 * world, 16, generator=torch.Generator().manual_seed(100 + step))
        for opt in optimizers:
            opt.zero_grad()
        oracle(x).square().sum().backward()
        y = layer(x[rank * 24 : (rank + 1) * 24], plan=Plan(reroute=True))
        y.square().sum().backward()
        assert layer.stats is not None
        log.append((layer.stats.expert_copies, layer.stats.replica_hits))
        for p in layer.router.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
        grads = layer.single_device_expert_grads()
        for name in ("w_in", "w_out"):
            want = getattr(oracle.experts, name).grad
            torch.testing.assert_close(grads[f"experts.{name}"], want, rtol=1e-4, atol=1e-5)
        for opt in optimizers:
            opt.step()

    infer(0)  # fills the replicas
    infer(1)  # served by them
    train(2)  # sends anyway (gradients go back), then the weights change
    infer(3)  # stale: refreshed
    infer(4)  # served again
    for key, want in oracle.state_dict().items():
        torch.testing.assert_close(layer.single_device_state_dict()[key], want, rtol=1e-5, atol=1e-6, msg=key)
    return log


def check_variable_k_mismatch(rank: int, world: int) -> list[str]:
    """Ranks that call with different ``top_p``: every rank raises, and the group goes on."""
    layer = MoELayer(16, 8, 4, 2, timeout=30)
    messages = []
    try:
        layer(torch.randn(3, 16), top_p=0.5 if rank == 0 else None)
    except RuntimeError as error:
        messages.append(str(error))
    layer(torch.randn(3, 16), top_p=0.5)  # the same on every rank: runs
    assert layer.stats is not None and layer.stats.experts_per_token is not None
    assert int(layer.stats.experts_per_token.sum()) == 3 * world
    return messages
