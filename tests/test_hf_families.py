"""Every MoE block class of the installed `transformers`: supported and equivalent, or refused with why."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("transformers", minversion="5.0")

import flexmoe.hf as hf
from flexmoe.experts import resolve_backend
from tests.hf_tiny import EXPERT_BACKENDS, bare_instance, tiny_block

BLOCKS = hf.discover_moe_blocks()
SUPPORTED_BLOCKS = [block for block in BLOCKS if block.name in hf.SUPPORTED]
ATOL = 2e-5


def _block_id(block: hf.MoEBlockClass) -> str:
    return f"{block.model_type}.{block.name}"


def _outputs_and_grads(
    holder: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = holder(x)
    y = y[0] if isinstance(y, tuple) else y
    (y * torch.linspace(-1.0, 1.0, y.shape[-1])).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad, {name: p.grad for name, p in holder.named_parameters() if p.grad is not None}


def assert_block_equivalent(block: nn.Module, seed: int = 0, tokens: int = 6, backend: str = "auto") -> None:
    """The converted block equals ``block``: outputs in eval, outputs and all gradients in training.

    On the expert ``backend`` (checked to be the one that ran), with the weights back bit
    for bit after ``revert`` when nothing was trained.
    """
    original = nn.Sequential(block)
    converted = copy.deepcopy(original)
    conversion = hf.convert(converted, backend=backend)
    assert list(conversion.blocks) == ["0"] and isinstance(converted[0], hf.FlexMoEBlock)
    x = torch.randn(
        2, tokens, block.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(seed)
    )
    for model in (original, converted):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=ATOL, rtol=1e-5)
    stats = conversion.blocks["0"].moe.stats
    assert stats is not None and stats.backend == resolve_backend(backend, x.device, x.dtype)
    _assert_same_state(hf.revert(copy.deepcopy(converted)).state_dict(), original.state_dict())
    for model in (original, converted):
        model.train()
    y_original, dx_original, grads_original = _outputs_and_grads(original, x)
    y_converted, dx_converted, _ = _outputs_and_grads(converted, x)
    torch.testing.assert_close(y_converted, y_original, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(dx_converted, dx_original, atol=ATOL, rtol=1e-4)
    hf.revert(converted)
    grads_converted = {name: p.grad for name, p in converted.named_parameters() if p.grad is not None}
    assert grads_converted.keys() == grads_original.keys()
    for name, grad in grads_original.items():
        torch.testing.assert_close(grads_converted[name], grad, atol=ATOL, rtol=1e-4, msg=name)


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected), (sorted(set(got) ^ set(expected)),)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def test_discovery_finds_the_families_we_know() -> None:
    names = {block.name for block in BLOCKS}
    for expected in (
        "MixtralSparseMoeBlock",
        "Qwen3MoeSparseMoeBlock",
        "Qwen2MoeSparseMoeBlock",
        "DeepseekV3MoE",
    ):
        assert expected in names
    model_types = {block.model_type for block in BLOCKS}
    assert {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
    } <= model_types
    assert {"granitemoe", "phimoe", "jamba", "dbrx", "switch_transformers", "llama4"} <= model_types
    assert len(model_types) >= 60


def test_every_table_entry_is_a_block_of_this_transformers() -> None:
    names = {block.name for block in BLOCKS}
    assert not set(hf.SUPPORTED) & set(hf.REFUSED)
    assert set(hf.SUPPORTED) <= names and set(hf.REFUSED) <= names
    # Every block class found is decided one way or the other (a newer transformers may
    # add classes: they are refused as "not verified" until added to the table).
    assert names == set(hf.SUPPORTED) | set(hf.REFUSED), sorted(names - set(hf.SUPPORTED) - set(hf.REFUSED))


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_every_moe_family_is_supported_and_equivalent_or_refused(block: hf.MoEBlockClass) -> None:
    block_class = block.load()
    if block.name in hf.SUPPORTED:
        assert hf.family_of(block_class) is hf.SUPPORTED[block.name]
        assert_block_equivalent(tiny_block(block_class))
        return
    reason = hf.REFUSED.get(block.name, "not verified with flexmoe")
    with pytest.raises(hf.UnsupportedMoEError) as info:
        hf.family_of(block_class)
    assert info.value.block_class == block.name and reason in info.value.reason
    holder = nn.Sequential(bare_instance(block_class))
    with pytest.raises(hf.UnsupportedMoEError, match=block.name) as info:
        hf.convert(holder)
    assert info.value.path == "0" and reason in str(info.value)


@pytest.mark.parametrize("backend", [b for b in EXPERT_BACKENDS if b != "auto"])
@pytest.mark.parametrize("block", SUPPORTED_BLOCKS, ids=_block_id)
def test_every_supported_family_is_equivalent_on_every_expert_backend(
    block: hf.MoEBlockClass, backend: str
) -> None:
    # "auto" runs in the test above.
    assert_block_equivalent(tiny_block(block.load()), backend=backend)


@pytest.mark.parametrize("block", SUPPORTED_BLOCKS, ids=_block_id)
def test_every_supported_family_saves_and_loads_as_itself(block: hf.MoEBlockClass) -> None:
    """``state_dict`` of a converted block is the original's; ``load_state_dict`` takes it back."""
    block_class = block.load()
    original = nn.Sequential(tiny_block(block_class, seed=0))
    converted = copy.deepcopy(original)
    hf.convert(converted)
    _assert_same_state(converted.state_dict(), original.state_dict())
    source = nn.Sequential(tiny_block(block_class, seed=1))  # other weights and selection biases
    result = converted.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(converted.state_dict(), source.state_dict())
    x = torch.randn(
        2, 5, source[0].experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(7)
    )
    for model in (source, converted):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), source(x), atol=ATOL, rtol=1e-5)
    hf.revert(converted)
    _assert_same_state(converted.state_dict(), source.state_dict())


@pytest.mark.parametrize(
    ("block_name", "overrides", "reason"),
    [
        ("Cohere2MoeSparseMoeBlock", {"shared_expert_combination_strategy": "average"}, "average"),
        ("HYV3MoE", {"enable_moe_fp32_combine": True}, "fp32"),
        ("Lfm2MoeSparseMoeBlock", {"norm_topk_prob": True}, "epsilon"),
        ("LagunaSparseMoeBlock", {"moe_router_logit_softcapping": 30.0}, "soft-caps"),
        ("DeepseekV2Moe", {"topk_method": "noaux_tc"}, "topk_method"),
        ("MixtralSparseMoeBlock", {"router_jitter_noise": 0.1}, "jitter"),
    ],
)
def test_configurations_without_a_flexmoe_equivalent_are_refused(
    block_name: str, overrides: dict[str, object], reason: str
) -> None:
    (found,) = [block for block in BLOCKS if block.name == block_name]
    block = tiny_block(found.load(), **overrides)
    with pytest.raises(hf.UnsupportedMoEError, match=reason):
        hf.convert(nn.Sequential(block))


def _load(name: str) -> type[nn.Module]:
    (found,) = [block for block in BLOCKS if block.name == name]
    return found.load()


@given(
    num_experts=st.sampled_from([4, 8, 16]),
    top_k=st.integers(2, 4),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 3)]),
    normalize=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_deepseek_v3_routing_settings(
    num_experts: int,
    top_k: int,
    groups: tuple[int, int],
    normalize: bool,
    scale: float,
    tokens: int,
    seed: int,
) -> None:
    num_groups, topk_groups = groups
    assume(num_experts // num_groups >= 2)  # transformers ranks groups by their two best scores
    top_k = min(top_k, topk_groups * num_experts // num_groups)
    block = tiny_block(
        _load("DeepseekV3MoE"),
        seed=seed,
        n_routed_experts=num_experts,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=num_groups,
        topk_group=topk_groups,
        norm_topk_prob=normalize,
        routed_scaling_factor=scale,
    )
    assert_block_equivalent(block, seed=seed, tokens=tokens)


@given(
    top_k=st.integers(1, 4),
    normalize=st.booleans(),
    shared=st.booleans(),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_qwen_routing_settings(top_k: int, normalize: bool, shared: bool, tokens: int, seed: int) -> None:
    name = "Qwen2MoeSparseMoeBlock" if shared else "Qwen3MoeSparseMoeBlock"
    block = tiny_block(_load(name), seed=seed, num_experts_per_tok=top_k, norm_topk_prob=normalize)
    assert_block_equivalent(block, seed=seed, tokens=tokens)  # renormalised top-1: weight 1


def test_renormalised_top_1_granite_converts_exactly() -> None:
    assert_block_equivalent(tiny_block(_load("GraniteMoeMoE"), num_experts_per_tok=1))


def test_bailing_hybrid_converts_without_a_swiglu_limit_and_is_refused_with_one() -> None:
    block_class = _load("BailingHybridMoE")
    assert_block_equivalent(tiny_block(block_class, swiglu_limits=None, num_hidden_layers=2))
    limited = tiny_block(block_class, swiglu_limits=[7.0, 7.0], num_hidden_layers=2)
    if getattr(limited.experts, "limit", None) is None:
        pytest.skip("this transformers' BailingHybrid experts have no SwiGLU limit")
    with pytest.raises(hf.UnsupportedMoEError, match="clamped SwiGLU"):
        hf.convert(nn.Sequential(limited))
