"""Router noise, input jitter and the cosine router's temperature floor, checked value by value.

Each training-time perturbation is recomputed from the same random stream, so a changed
scale, range or floor fails here (a test of finiteness or shape would not notice).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexmoe import RouterConfig
from flexmoe.routing import build_router


def _router(**fields: object):
    torch.manual_seed(0)
    return build_router(16, 8, RouterConfig(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("std", [0.1, 1.0])
def test_logit_noise_has_the_configured_scale(std):
    router = _router(noise_std=std)
    x = torch.randn(64, 16)
    clean = router.logits(x.float())
    router.train()
    torch.manual_seed(7)
    noisy = router(x, 2).logits_TE
    torch.manual_seed(7)
    expected = clean + torch.randn_like(clean) * std
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)
    router.eval()
    torch.testing.assert_close(router(x, 2).logits_TE, clean, rtol=0, atol=0)  # no noise outside training


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_input_jitter_is_uniform_in_the_configured_range(eps):
    router = _router(input_jitter=eps)
    x = torch.randn(64, 16)
    router.train()
    torch.manual_seed(3)
    jittered = router(x, 2).logits_TE
    torch.manual_seed(3)
    factor = torch.empty_like(x).uniform_(1 - eps, 1 + eps)
    torch.testing.assert_close(jittered, router.logits(x * factor), rtol=0, atol=1e-6)
    assert float(factor.min()) >= 1 - eps and float(factor.max()) <= 1 + eps


def test_cosine_temperature_is_floored_at_one_hundredth():
    router = _router(kind="cosine")
    x = torch.randn(4, 16)
    h = F.normalize(F.linear(x, router.proj), dim=-1)
    with torch.no_grad():
        router.expert_embeddings[0] = h[0]  # cosine 1 between token 0 and expert 0
        router.log_temperature.fill_(math.log(1e-4))  # far below the floor
    logits = router.logits(x).detach()
    assert float(logits[0, 0]) == pytest.approx(100.0, rel=1e-5)  # 1 / 0.01
    assert float(logits.abs().max()) <= 100.0 * (1 + 1e-5)
    with torch.no_grad():
        router.log_temperature.fill_(math.log(0.5))  # above the floor: the learned value
    assert float(router.logits(x).detach()[0, 0]) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kind": "sigmoid", "selection_bias": True, "num_groups": 4, "topk_groups": 2},
        {"kind": "cosine"},
        {"top_p": 0.6, "min_k": 1},
        {"kind": "sigmoid", "top_p": 0.5, "routed_scaling_factor": 2.5},
    ],
)
def test_choose_picks_what_forward_routes(fields):
    router = _router(**fields).eval()
    if router.expert_bias_E is not None:
        router.expert_bias_E.copy_(torch.randn(8))
    x = torch.randn(11, 16).bfloat16()
    top_p = fields.get("top_p")
    route = router(x, 3, top_p)
    choice = router.choose(x, 3, top_p)
    assert torch.equal(choice.expert_ids_TK, route.expert_ids_TK)
    assert torch.equal(choice.probs_TE, route.probs_TE)
    assert torch.equal(choice.logits_TE, route.logits_TE)
    assert (choice.valid_TK is None) == (top_p is None)
    if top_p is not None:
        assert torch.equal(choice.valid_TK, route.valid_TK)
    # the weights forward reads are the scores of the chosen experts
    weights = choice.scores_TE.gather(1, choice.expert_ids_TK)
    if choice.valid_TK is not None:
        weights = weights * choice.valid_TK
    if fields.get("kind") != "sigmoid" or top_p is None:
        normalized = weights / weights.sum(-1, keepdim=True)
        torch.testing.assert_close(normalized * fields.get("routed_scaling_factor", 1.0), route.weights_TK)
