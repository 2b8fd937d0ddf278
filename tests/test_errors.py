"""Bad input fails early, with the argument's name; empty input and non-finite checks.

Legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexmoe import MoEConfig, MoELayer, Plan, RouterConfig

D, F, E = 6, 5, 4


def make_layer(**kwargs) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D, F, E, **kwargs)


# ----------------------------------------------------------------- forward inputs
def test_wrong_last_dim() -> None:
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., dim=6\]"):
        make_layer()(torch.randn(3, D + 1))


def test_zero_dim_tensor() -> None:
    with pytest.raises(ValueError, match="x must have shape"):
        make_layer()(torch.tensor(1.0))


def test_integer_input() -> None:
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        make_layer()(torch.ones(3, D, dtype=torch.int64))


@pytest.mark.parametrize("x", [[[0.0] * D], None, "x"])
def test_non_tensor_input(x) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        make_layer()(x)


def test_dtype_mismatch_without_autocast() -> None:
    with pytest.raises(
        TypeError, match=r"x has dtype torch\.bfloat16 but the experts' weights are torch\.float32"
    ):
        make_layer()(torch.randn(3, D, dtype=torch.bfloat16))


def test_plan_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"plan must be a flexmoe\.Plan"):
        make_layer()(torch.randn(3, D), plan={"r": 1})


@pytest.mark.parametrize("bad", [{"r": -1}, {"d": 0}, {"exchange": "ring"}])
def test_bad_plan_values(bad) -> None:
    with pytest.raises(ValueError, match=r"plan\."):
        Plan(**bad)


# ----------------------------------------------------------------- top_k
@pytest.mark.parametrize("top_k", [0, -1, E + 1, 2.0, True, "2"])
def test_top_k_outside_range_in_constructor(top_k) -> None:
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=4\]"):
        make_layer(top_k=top_k)


@pytest.mark.parametrize("top_k", [0, E + 1, 1.5])
def test_top_k_outside_range_in_forward(top_k) -> None:
    layer = make_layer()
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=4\]"):
        layer(torch.randn(3, D), top_k=top_k)


def test_top_k_beyond_reachable_groups() -> None:
    router = RouterConfig(num_groups=2, topk_groups=1)  # 2 groups of 2: at most 2 experts reachable
    with pytest.raises(ValueError, match="top_k"):
        make_layer(top_k=3, router=router)
    layer = make_layer(top_k=2, router=router)
    with pytest.raises(ValueError, match="top_k"):
        layer(torch.randn(3, D), top_k=3)


# ----------------------------------------------------------------- capacity_factor
@pytest.mark.parametrize(
    "capacity_factor", [float("nan"), float("inf"), -float("inf"), "1.0", True, None, [1.0]]
)
def test_nonsense_capacity_factor_in_constructor(capacity_factor) -> None:
    with pytest.raises((ValueError, TypeError), match="capacity_factor must be"):
        make_layer(capacity_factor=capacity_factor)


@pytest.mark.parametrize("capacity_factor", [float("nan"), float("inf"), "1.0", False])
def test_nonsense_capacity_factor_in_forward(capacity_factor) -> None:
    layer = make_layer()
    with pytest.raises((ValueError, TypeError), match="capacity_factor must be"):
        layer(torch.randn(3, D), capacity_factor=capacity_factor)


# ----------------------------------------------------------------- names and configs
def test_bad_activation() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        make_layer(activation="tanh")


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        make_layer(backend="cuda")


def test_bad_router_name() -> None:
    with pytest.raises(ValueError, match=r"router\.kind must be one of"):
        make_layer(router="linear")


def test_router_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="router must be"):
        make_layer(router=3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dim": 0}, "dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 6, "router": RouterConfig(num_groups=4, topk_groups=1)}, "router.num_groups"),
    ],
)
def test_bad_sizes(kwargs, name) -> None:
    base = {"dim": D, "hidden_dim": F, "num_experts": E, "top_k": 1}
    with pytest.raises(ValueError, match=name):
        MoEConfig(**{**base, **kwargs})


def test_aux_free_rate_needs_selection_bias() -> None:
    with pytest.raises(ValueError, match="aux_free_rate"):
        make_layer(router=RouterConfig(selection_bias=False), aux_free_rate=0.1)


def test_from_config_needs_a_config() -> None:
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        MoELayer.from_config({"dim": D})


# ----------------------------------------------------------------- custom experts
def test_module_list_of_wrong_length() -> None:
    experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E - 1))
    with pytest.raises(ValueError, match="experts must hold num_experts=4 modules, got 3"):
        make_layer(experts=experts)


class ScaleExperts(nn.Module):
    """Custom experts: expert ``e`` multiplies its rows by ``scale[e]``."""

    def __init__(self, num_experts: int, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.out_dim = out_dim or dim
        self.scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        scale_N = torch.repeat_interleave(self.scale, torch.tensor(counts))
        y_ND = x_ND * scale_N[:, None]
        if self.out_dim != self.dim:
            y_ND = torch.cat([y_ND, y_ND], dim=-1)[:, : self.out_dim]
        return y_ND


@pytest.mark.parametrize(("num_experts", "dim", "name"), [(E + 1, D, "num_experts"), (E, D + 1, "dim")])
def test_custom_experts_with_mismatched_attributes(num_experts, dim, name) -> None:
    with pytest.raises(ValueError, match=f"experts.{name} must be"):
        make_layer(experts=ScaleExperts(num_experts, dim))


def test_custom_experts_without_attributes() -> None:
    with pytest.raises(ValueError, match=r"experts\.num_experts must be"):
        make_layer(experts=nn.Linear(D, D))


def test_experts_that_are_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"experts must be an nn\.Module"):
        make_layer(experts=lambda x, counts: x)


def test_module_list_expert_returning_wrong_shape() -> None:
    experts = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D + 1), nn.Linear(D, D), nn.Linear(D, D)])
    layer = make_layer(top_k=E, experts=experts)  # top_k=E: every expert sees every token
    with pytest.raises(ValueError, match=r"experts\[1\] must map \[n, 6\] to \[n, 6\]"):
        layer(torch.randn(3, D))


def test_custom_experts_module_returning_wrong_shape() -> None:
    layer = make_layer(experts=ScaleExperts(E, D, out_dim=D + 1))
    with pytest.raises(ValueError, match="experts"):
        layer(torch.randn(3, D))


# ----------------------------------------------------------------- empty input
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D), (0, 3, D)])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, -1.0])
def test_zero_tokens(shape, capacity_factor) -> None:
    layer = make_layer(capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    (y.sum() + layer.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.stats.num_tokens == 0
    assert layer.stats.dropped == 0
    assert layer.stats.tokens_per_expert.tolist() == [0] * E
    assert layer.aux_loss.shape == ()


# ----------------------------------------------------------------- non-finite input
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises(value) -> None:
    layer = make_layer(check_finite=True)
    x = torch.randn(4, D)
    x[2, 3] = value
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)


def test_non_finite_is_silent_by_default() -> None:
    layer = make_layer()
    x = torch.randn(4, D)
    x[2, 3] = float("nan")
    y = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y[[0, 1, 3]]).all(), "a NaN token must not poison the other tokens"


def test_single_device_rejects_sharding_degrees():
    layer = MoELayer(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"plan.r must be None, 0 or 1 on a single device, got 2"):
        layer(torch.randn(3, 8), plan=Plan(r=2))
