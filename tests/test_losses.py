"""Balancing terms: the load-balance loss, the z-loss and the aux-loss-free bias rule.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexmoe import MoELayer, attach_aux_free_update, update_expert_biases
from flexmoe.routing import aux_free_bias_update, load_balance_loss, router_z_loss

LN2 = math.log(2.0)


# ----------------------------------------------------------------- load-balance loss
def test_load_balance_loss_top1_by_hand() -> None:
    # T=2, E=2, K=1, both tokens choose e0: f = [1, 0]; P = mean([.5,.5], [1,0]) = [.75, .25].
    # loss = E * sum f_i P_i = 2 * (1 * .75) = 1.5.
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    ids = torch.tensor([[0], [0]])
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.5))


def test_load_balance_loss_top2_by_hand_with_gradient() -> None:
    # T=2, E=3, K=2. Choices e0,e1 | e1,e2: counts [1, 2, 1] -> f = [.25, .5, .25].
    # P = mean([.5,.3,.2], [.1,.6,.3]) = [.3, .45, .25].
    # loss = 3 * (.25*.3 + .5*.45 + .25*.25) = 3 * .3625 = 1.0875.
    # d loss / d probs[t, i] = E * f_i / T = 1.5 * f = [.375, .75, .375] for every token.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 2]])
    loss = load_balance_loss(probs, ids)
    torch.testing.assert_close(loss, torch.tensor(1.0875))
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.tensor([[0.375, 0.75, 0.375]] * 2))


@pytest.mark.parametrize("K", [1, 2, 4])
def test_load_balance_loss_is_one_when_uniform(K: int) -> None:
    # E=4, T=4: every expert chosen T*K/E times, probs uniform -> E * sum (1/E)(1/E) = 1.
    probs = torch.full((4, 4), 0.25)
    ids = torch.tensor([[(t + j) % 4 for j in range(K)] for t in range(4)])
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))


# ----------------------------------------------------------------- z-loss
def test_router_z_loss_by_hand_with_gradient() -> None:
    # row 0: logsumexp(0, 0) = ln 2; row 1: logsumexp(ln 3, 0) = ln 4 = 2 ln 2.
    # z = mean(ln2^2, 4 ln2^2) = 2.5 ln2^2.
    # d z / d logits[t] = 2 * lse_t * softmax(logits_t) / T:
    #   row 0: 2 * ln2 * [.5, .5] / 2 = [ln2/2, ln2/2]; row 1: 2 * 2ln2 * [.75, .25] / 2 = [1.5 ln2, .5 ln2].
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    z = router_z_loss(logits)
    torch.testing.assert_close(z, torch.tensor(2.5 * LN2**2))
    z.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[LN2 / 2, LN2 / 2], [1.5 * LN2, 0.5 * LN2]]))


# ----------------------------------------------------------------- aux-free rule
def test_aux_free_bias_update_by_hand() -> None:
    # counts [5, 1, 3, 3], mean 3: sign(mean - c) = [-1, +1, 0, 0]; rate .01.
    bias = torch.tensor([0.1, 0.0, -0.2, 0.0])
    new = aux_free_bias_update(bias, torch.tensor([5, 1, 3, 3]), 0.01)
    torch.testing.assert_close(new, torch.tensor([0.09, 0.01, -0.2, 0.0]))
    assert torch.equal(bias, torch.tensor([0.1, 0.0, -0.2, 0.0])), "the update must be pure"


def make_balanced_layer(rate: float = 0.05, **kwargs) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(6, 5, 4, top_k=2, aux_free_rate=rate, activation="relu", **kwargs)


def expected_step(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    counts = counts.double()
    return bias + rate * torch.sign(counts.mean() - counts).to(bias.dtype)


def test_update_expert_bias_moves_each_expert_by_rate() -> None:
    layer = make_balanced_layer(rate=0.05).train()
    before = layer.router.expert_bias_E.clone()
    layer(torch.randn(11, 6))
    counts = layer.stats.routed_per_expert.clone()
    assert counts.max() > counts.min(), "the example needs an unbalanced step"
    layer.update_expert_bias()
    delta = layer.router.expert_bias_E - before
    torch.testing.assert_close(delta, 0.05 * torch.sign(counts.double().mean() - counts.double()).float())
    # Overloaded experts go down, under-loaded ones go up.
    mean = counts.double().mean()
    assert all((d < 0) == (c > mean) and (d > 0) == (c < mean) for d, c in zip(delta, counts, strict=True))


def test_update_expert_bias_sums_micro_batches_and_resets() -> None:
    layer = make_balanced_layer().train()
    layer(torch.randn(7, 6))
    first = layer.stats.routed_per_expert.clone()
    layer(torch.randn(5, 6))
    total = first + layer.stats.routed_per_expert
    before = layer.router.expert_bias_E.clone()
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias_E, expected_step(before, total, 0.05))
    # Nothing new was seen: a second update is a no-op.
    after = layer.router.expert_bias_E.clone()
    layer.update_expert_bias()
    assert torch.equal(layer.router.expert_bias_E, after)


def test_eval_forward_does_not_count_loads() -> None:
    layer = make_balanced_layer().eval()
    layer(torch.randn(9, 6))
    layer.update_expert_bias()
    assert torch.equal(layer.router.expert_bias_E, torch.zeros(4))


def test_update_expert_bias_counts_exactly_in_a_bf16_layer() -> None:
    # E=2, K=1: 300 tokens go to e0 and 301 to e1 (mean 300.5), so e0 must go up and e1
    # down by the rate. A bf16 count buffer rounds 301 to 300 and makes the step vanish.
    layer = MoELayer(2, 2, 2, top_k=1, aux_free_rate=0.1).to(torch.bfloat16).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]] * 300 + [[-1.0, 0.0]] * 301, dtype=torch.bfloat16)
    layer(x)
    assert layer.stats.routed_per_expert.tolist() == [300, 301]
    layer.update_expert_bias()
    bias = layer.router.expert_bias_E.float()
    torch.testing.assert_close(bias, torch.tensor([0.1, -0.1]), atol=1e-3, rtol=0)


def test_small_rate_survives_bf16_conversion() -> None:
    # DeepSeek-V3 uses rate 1e-3; after .to(bf16), a bias near 1 must still move by it
    # (bf16 spacing at 1.0 is 2**-7, so a bf16 bias buffer would not move at all).
    layer = make_balanced_layer(rate=1e-3).to(torch.bfloat16).train()
    with torch.no_grad():
        layer.router.expert_bias_E.fill_(1.0)
    layer(torch.randn(11, 6, dtype=torch.bfloat16))
    counts = layer.stats.routed_per_expert.clone()
    layer.update_expert_bias()
    expected = 1.0 + 1e-3 * torch.sign(counts.double().mean() - counts.double())
    torch.testing.assert_close(layer.router.expert_bias_E.double(), expected, atol=1e-6, rtol=0)


def test_attach_aux_free_update_runs_after_optimizer_step() -> None:
    layer = make_balanced_layer(rate=0.02)
    model = nn.Sequential(nn.Linear(6, 6), layer).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach_aux_free_update(optimizer, model)

    before = layer.router.expert_bias_E.clone()
    y = model(torch.randn(13, 6))
    counts = layer.stats.routed_per_expert.clone()
    (y.square().mean() + layer.aux_loss).backward()
    assert torch.equal(layer.router.expert_bias_E, before), "backward alone must not move the bias"
    optimizer.step()
    torch.testing.assert_close(layer.router.expert_bias_E, expected_step(before, counts, 0.02))

    handle.remove()
    after = layer.router.expert_bias_E.clone()
    model(torch.randn(13, 6)).sum().backward()
    optimizer.step()
    assert torch.equal(layer.router.expert_bias_E, after), "a removed hook must not update"


def test_update_expert_biases_visits_every_layer() -> None:
    layers = [make_balanced_layer(), make_balanced_layer()]
    x = torch.randn(9, 6)
    for layer in layers:
        layer.train()(x)
    update_expert_biases(nn.ModuleList(layers))
    for layer in layers:
        assert layer.router.expert_bias_E.abs().sum() > 0


def test_aux_free_balancing_reduces_load_skew() -> None:
    # A router that sends most tokens to experts 0 and 1: every token has a shared
    # direction u that rows 0 and 1 of the router weight align with.
    torch.manual_seed(0)
    D, E = 16, 8
    layer = MoELayer(D, 4, E, top_k=2, aux_free_rate=0.005, activation="relu").train()
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        layer.router.weight[:2] += 2.0 * u

    def batch(n: int) -> torch.Tensor:
        return torch.randn(n, D) + u

    def skew(x: torch.Tensor) -> float:
        was_training = layer.training
        layer.eval()
        layer(x)
        layer.train(was_training)
        return layer.stats.load_max_over_mean

    probe = batch(1024)
    initial = skew(probe)
    assert initial > 2.5
    with torch.no_grad():
        for _ in range(100):
            layer(batch(128))
            layer.update_expert_bias()
    final = skew(probe)
    assert final < 1.4
    assert final < initial / 2
