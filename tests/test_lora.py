"""LoRA on grouped experts against a dense reference: outputs and gradients, merge, frozen base.

Legend: N rows (expert-major), D model dim, F expert hidden dim, H first-projection width,
E experts, k adapted experts, r rank.

The reference runs every row through its expert with the dense updated weights
``W + s * B @ A`` in fp64 (with dropout: the low-rank path on the dropped input, with
the masks every backend draws in the same order from the same seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer
from flexmoe.adapters import (
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from flexmoe.experts import GroupedExperts
from flexmoe.experts import lora as lora_module
from flexmoe.experts.lora import ExpertLoRA, lora_masks
from tests.reference import activation_fn

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]
BACKENDS = ["loop", "fused", "grouped_mm"]
FACTORS = ("A_in", "B_in", "A_out", "B_out")


@dataclass
class Case:
    E: int
    D: int
    F: int
    r: int
    activation: str
    bias: bool
    counts: list[int]
    experts: list[int] | None
    targets: tuple[str, ...]
    row_weights: bool
    train_base: bool
    seed: int


@st.composite
def cases(draw) -> Case:
    E = draw(st.integers(1, 6))
    experts = draw(st.one_of(st.none(), st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True)))
    counts = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=E, max_size=E))
    if not any(counts):  # an empty batch has nothing to differentiate
        counts[-1] = 2
    return Case(
        E=E,
        D=draw(st.integers(1, 7)),
        F=draw(st.integers(1, 6)),
        r=draw(st.integers(1, 4)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        counts=counts,
        experts=experts,
        targets=draw(st.sampled_from([("w_in", "w_out"), ("w_in",), ("w_out",)])),
        row_weights=draw(st.booleans()),
        train_base=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def make_experts(case: Case, backend: str, dropout: float = 0.0) -> GroupedExperts:
    torch.manual_seed(case.seed)
    experts = GroupedExperts(case.E, case.D, case.F, case.activation, case.bias, backend)
    width = experts.w_in.shape[1]
    experts.lora = ExpertLoRA(
        case.E,
        case.D,
        width,
        case.F,
        case.r,
        alpha=3.0,
        dropout=dropout,
        experts=case.experts,
        targets=case.targets,
    )
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for p in experts.lora.parameters():
            p.normal_()
    for p in (experts.w_in, experts.w_out, experts.b_in, experts.b_out):
        if p is not None:
            p.requires_grad_(case.train_base)
    return experts


def reference(
    experts: GroupedExperts,
    x_ND: torch.Tensor,
    counts: list[int],
    rw_N: torch.Tensor | None,
    masks=(None, None),
) -> torch.Tensor:
    """Every row through its expert with dense updated weights (the low-rank path under dropout), fp64."""
    lora = experts.lora
    assert lora is not None
    d = torch.float64
    w_in, w_out = experts.w_in.to(d), experts.w_out.to(d)
    b_in = None if experts.b_in is None else experts.b_in.to(d)
    b_out = None if experts.b_out is None else experts.b_out.to(d)
    factor = {name: None if getattr(lora, name) is None else getattr(lora, name).to(d) for name in FACTORS}
    mask_in, mask_out = masks
    rows = []
    start = 0
    for e, n in enumerate(counts):
        k = lora.slot_of_expert[e]
        W_in, W_out = w_in[e], w_out[e]
        for i in range(start, start + n):
            x = x_ND[i].to(d)
            h = W_in @ x + (0 if b_in is None else b_in[e])
            if k >= 0 and factor["A_in"] is not None:
                x_lora = x if mask_in is None else x * mask_in[i].to(d)
                h = h + lora.scaling * factor["B_in"][k] @ (factor["A_in"][k] @ x_lora)
            a = activation_fn(experts.activation, h)
            w = 1.0 if rw_N is None else rw_N[i].to(d)
            y = W_out @ (w * a) + (0 if b_out is None else w * b_out[e])
            if k >= 0 and factor["A_out"] is not None:
                a_lora = w * a if mask_out is None else w * a * mask_out[i].to(d)
                y = y + lora.scaling * factor["B_out"][k] @ (factor["A_out"][k] @ a_lora)
            rows.append(y)
        start += n
    return torch.stack(rows) if rows else x_ND.new_zeros(0, experts.dim, dtype=d)


def dense_delta_reference(experts: GroupedExperts, x_ND, counts, rw_N) -> torch.Tensor:
    """The same layer with the dense per-expert deltas folded into copies of the base weights."""
    lora = experts.lora
    assert lora is not None
    plain = GroupedExperts(
        experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, False, "loop"
    )
    plain = plain.to(torch.float64)
    with torch.no_grad():
        plain.w_in.copy_(experts.w_in)
        plain.w_out.copy_(experts.w_out)
        ids = list(lora.experts)
        for target, weight in (("w_in", plain.w_in), ("w_out", plain.w_out)):
            delta = lora.delta(target)
            if delta is not None:
                weight[ids] += delta.to(torch.float64)
    bias_in = None if experts.b_in is None else experts.b_in.to(torch.float64)
    bias_out = None if experts.b_out is None else experts.b_out.to(torch.float64)
    weights = (plain.w_in, plain.w_out, bias_in, bias_out)
    rw = None if rw_N is None else rw_N.to(torch.float64)
    return plain.apply_weights(x_ND.to(torch.float64), counts, weights, rw)


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed + 1)
    N = sum(case.counts)
    x = torch.randn(N, case.D, generator=g)
    rw = torch.rand(N, generator=g) + 0.5 if case.row_weights else None
    grad_y = torch.randn(N, case.D, generator=g)
    return x, rw, grad_y


def run(experts: GroupedExperts, case: Case, x, rw, grad_y, backend: str, seed: int = 0):
    """Output and gradients ``{x, rw, A_in, ..., w_in}`` of one forward and backward."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    rw = None if rw is None else rw.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = experts(x, case.counts, rw, backend=backend)
    (y * grad_y).sum().backward()
    return y, gradients(experts, x, rw)


def reference_grads(experts: GroupedExperts, case: Case, x, rw, grad_y, masks=(None, None)):
    """The reference's output and gradients, by autograd through the fp64 reference."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().to(torch.float64).requires_grad_(True)
    rw = None if rw is None else rw.detach().to(torch.float64).requires_grad_(True)
    y = reference(experts, x, case.counts, rw, masks)
    (y * grad_y.to(torch.float64)).sum().backward()
    return y, gradients(experts, x, rw)


def gradients(experts: GroupedExperts, x, rw) -> dict:
    """``{x, rw, A_in, ..., w_in, w_out}``: the gradients a backward left."""
    grads = {"x": x.grad, "rw": None if rw is None else rw.grad}
    assert experts.lora is not None
    for name in FACTORS:
        p = getattr(experts.lora, name)
        grads[name] = None if p is None else p.grad
    grads["w_in"], grads["w_out"] = experts.w_in.grad, experts.w_out.grad
    return grads


def assert_close_grads(got: dict, want: dict) -> None:
    for name, expected in want.items():
        actual = got[name]
        if expected is None:
            # the reference produced no gradient: a frozen base, or rows that never reach it
            assert actual is None or not actual.any(), name
            continue
        if actual is None:
            assert not expected.any(), name
            continue
        torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=1e-4, msg=name)


@contextmanager
def lora_form(form: str) -> Iterator[None]:
    """Make the cost model pick ``form``: the terms per segment, or the dense updated weights."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_module, "SEGMENT_TERM_S", FORMS[form])
        yield


# SEGMENT_TERM_S for each form: per-segment terms that cost nothing, or a second each
FORMS = {"segments": 0.0, "dense": 1.0}


# ------------------------------------------------------------------ reference tests
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_lora_matches_dense_reference(backend: str, form: str, case: Case) -> None:
    experts = make_experts(case, backend)
    x, rw, grad_y = inputs(case)
    with lora_form(form):
        y, grads = run(experts, case, x, rw, grad_y, backend)
    want_y, want = reference_grads(experts, case, x, rw, grad_y)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        y.double(), dense_delta_reference(experts, x, case.counts, rw), rtol=1e-4, atol=1e-4
    )
    assert_close_grads(grads, want)
    if not case.train_base:
        assert experts.w_in.grad is None and experts.w_out.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_lora_dropout_matches_reference_with_the_same_masks(backend: str, case: Case) -> None:
    experts = make_experts(case, backend, dropout=0.4)
    x, rw, grad_y = inputs(case)
    y, grads = run(experts, case, x, rw, grad_y, backend, seed=7)
    assert experts.lora is not None
    torch.manual_seed(7)
    masks = lora_masks(experts.lora.terms(), x.shape[0], case.D, case.F, x)
    want_y, want = reference_grads(experts, case, x, rw, grad_y, masks)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    assert_close_grads(grads, want)
    experts.eval()  # no dropout outside training: the plain reference
    with torch.no_grad():
        y_eval = experts(x, case.counts, rw, backend=backend)
    torch.testing.assert_close(y_eval.double(), reference(experts, x, case.counts, rw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_merged_equals_unmerged_and_unmerge_restores(backend: str, form: str, case: Case) -> None:
    experts = make_experts(case, backend)
    x, rw, _ = inputs(case)
    w_in, w_out = experts.w_in.detach().clone(), experts.w_out.detach().clone()
    with torch.no_grad(), lora_form(form):
        unmerged = experts(x, case.counts, rw, backend=backend)
        assert experts.lora is not None
        experts.lora.merge_into(experts.w_in, experts.w_out)
        assert experts.active_lora() is None
        merged = experts(x, case.counts, rw, backend=backend)
        experts.lora.unmerge_from(experts.w_in, experts.w_out)
        again = experts(x, case.counts, rw, backend=backend)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(experts.w_in.detach(), w_in, rtol=0, atol=1e-5)
    torch.testing.assert_close(experts.w_out.detach(), w_out, rtol=0, atol=1e-5)


def test_the_dense_updates_where_the_experts_are_narrow_and_never_with_dropout() -> None:
    def pays(E: int, D: int, F: int, rows: int, grad: bool, dropout: float = 0.0) -> bool:
        lora = ExpertLoRA(E, D, 2 * F, F, 8, alpha=16.0, dropout=dropout)
        terms = lora.terms()
        assert terms is not None
        w_in, w_out = torch.empty(E, 2 * F, D), torch.empty(E, D, F)
        return lora_module.dense_updates_pay(terms, rows, w_in, w_out, grad)

    # the fine-tuning benchmark's two shapes (64 experts, 4 x 128 tokens top-8)
    assert pays(64, 128, 64, 4096, grad=True)
    assert not pays(64, 512, 192, 4096, grad=True)
    assert not pays(64, 128, 64, 4096, grad=True, dropout=0.1)
    # decoding a Qwen3-30B-shaped layer: never rewrite 128 experts' weights for 8 rows
    assert not pays(128, 2048, 768, 8, grad=False)


@pytest.mark.parametrize("adapted", [None, [0, 2]])
def test_dense_updates_add_the_delta_to_the_adapted_experts_only(adapted) -> None:
    torch.manual_seed(0)
    lora = ExpertLoRA(3, 5, 8, 4, 2, alpha=3.0, experts=adapted)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_()
    w_in, w_out = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    terms = lora.terms()
    assert terms is not None
    new_in, new_out = lora_module.with_dense_updates(terms, w_in, w_out)
    ids = list(lora.experts)
    for new, old, target in ((new_in, w_in, "w_in"), (new_out, w_out, "w_out")):
        expected = old.clone()
        expected[ids] += lora.delta(target).detach()
        torch.testing.assert_close(new.detach(), expected)
    with pytest.raises(ValueError, match="dropout"):
        dropped = ExpertLoRA(3, 5, 8, 4, 2, alpha=3.0, dropout=0.5).terms()
        assert dropped is not None
        lora_module.with_dense_updates(dropped, w_in, w_out)


def test_no_grad_forward_equals_training_forward() -> None:
    """The fused backend's forward without autograd (training layout) equals the one with it."""
    case = Case(4, 6, 5, 2, "swiglu", True, [3, 0, 4, 2], [0, 2], ("w_in", "w_out"), True, False, 3)
    experts = make_experts(case, "fused")
    x, rw, _ = inputs(case)
    with torch.no_grad():
        y_no_grad = experts(x, case.counts, rw)
    y = experts(x, case.counts, rw)
    torch.testing.assert_close(y_no_grad, y.detach())


def test_new_adapter_changes_nothing_and_bf16_runs() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, top_k=2)
    x = torch.randn(5, 8)
    before = layer(x).detach()
    add_lora(layer, rank=2, alpha=4)
    torch.testing.assert_close(layer(x).detach(), before)
    layer = layer.to(torch.bfloat16)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------- the user API
def test_add_lora_freezes_the_base_and_trains_only_the_adapters() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, top_k=2, backend="fused")
    adapters = add_lora(layer, rank=2, alpha=4, experts=[1, 3])
    assert list(adapters) == ["experts"]
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["experts.lora.A_in", "experts.lora.B_in", "experts.lora.A_out", "experts.lora.B_out"]
    x = torch.randn(16, 8)
    layer(x).square().sum().backward()
    lora = layer.experts.lora
    assert lora is not None and lora.B_in is not None and lora.B_in.grad is not None
    assert lora.B_in.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.parameters() if not p.requires_grad)


def test_state_dict_round_trip_and_merge_api() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, top_k=2)
    add_lora(layer, rank=3, alpha=6, targets=("w_out",))
    with torch.no_grad():
        for p in layer.experts.lora.parameters():
            p.normal_()
    state = lora_state_dict(layer)
    assert set(state) == {"experts.lora.A_out", "experts.lora.B_out", "experts.lora.expert_ids"}
    x = torch.randn(6, 8)
    want = layer(x).detach()

    torch.manual_seed(0)
    other = MoELayer(8, 12, 4, top_k=2)
    add_lora(other, rank=3, alpha=6, targets=("w_out",))
    load_lora_state_dict(other, state)
    torch.testing.assert_close(other(x).detach(), want)
    merge_lora(other)
    torch.testing.assert_close(other(x).detach(), want, rtol=1e-5, atol=1e-5)
    unmerge_lora(other)
    torch.testing.assert_close(other(x).detach(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="A_out"):
        load_lora_state_dict(other, {**state, "experts.lora.A_out": torch.zeros(1)})


def test_add_lora_errors() -> None:
    layer = MoELayer(8, 12, 4, top_k=2)
    with pytest.raises(ValueError, match="rank"):
        add_lora(layer, rank=0)
    with pytest.raises(ValueError, match="targets"):
        add_lora(layer, rank=2, targets=("w_up",))
    with pytest.raises(ValueError, match="experts"):
        add_lora(layer, rank=2, experts=[4])
    with pytest.raises(ValueError, match="GroupedExperts"):
        add_lora(torch.nn.Linear(2, 2), rank=2)
    add_lora(layer, rank=2)
    with pytest.raises(ValueError, match="already"):
        add_lora(layer, rank=2)


def test_fused_segments_on_threads_equal_the_loop() -> None:
    """The fused backend spreads balanced segments over threads: the LoRA terms too."""
    case = Case(8, 6, 5, 3, "swiglu", False, [4] * 8, [0, 2, 3, 7], ("w_in", "w_out"), True, True, 11)
    x, rw, grad_y = inputs(case)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, grads = run(make_experts(case, "fused"), case, x, rw, grad_y, "fused")
    finally:
        torch.set_num_threads(threads)
    want_y, want = run(make_experts(case, "loop"), case, x, rw, grad_y, "loop")
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert_close_grads(grads, want)


def test_layer_backends_agree_with_lora() -> None:
    """Through a whole MoELayer (routing, capacity, combine): every backend, outputs and grads."""
    results = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        layer = MoELayer(8, 12, 4, top_k=2, backend=backend, capacity_factor=1.0)
        add_lora(layer, rank=4, alpha=8, experts=[0, 3])
        with torch.no_grad():
            for p in layer.experts.lora.parameters():
                p.normal_(0.0, 0.3)
        x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        layer(x).square().sum().backward()
        grads = [p.grad for p in layer.experts.lora.parameters()]
        results.append((layer(x).detach(), x.grad, grads))
    for y, grad_x, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_x, results[0][1], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_paths_without_lora_support_refuse_an_unmerged_adapter() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, top_k=2)
    add_lora(layer, rank=2)
    experts = layer.experts
    x = torch.randn(4, 8)
    weights = (experts.w_in, experts.w_out, None, None)
    with pytest.raises(ValueError, match="lora_factors"):  # moved weights need the moved factors
        experts.apply_weights(x, [1, 1, 1, 1], weights)
    with torch.no_grad():  # an adapter of every expert: its factors travel with the weights
        for p in experts.lora.parameters():
            p.normal_()
        moved = experts.apply_weights(x, [1, 1, 1, 1], weights, lora_factors=experts.travelling_lora())
        torch.testing.assert_close(moved, experts(x, [1, 1, 1, 1]))
    with pytest.raises(NotImplementedError, match="forward_tokens"):
        experts.forward_rows(x, torch.tensor([1, 1, 1, 1]), torch.ones(4))
    with torch.no_grad():  # packed inference weights (base only) are not used while an adapter is active
        for p in experts.lora.parameters():
            p.normal_()
        experts.prepare_for_inference()
        y, want = experts(x, [1, 1, 1, 1]), experts(x, [1, 1, 1, 1], backend="loop")
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    merge_lora(layer)
    experts.apply_weights(x, [1, 1, 1, 1], weights)  # merged: the base path everywhere


def test_per_layer_experts_and_remove() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoELayer(8, 12, 4, top_k=2), MoELayer(8, 12, 4, top_k=2))
    adapters = add_lora(model, rank=2, alpha=2, experts={"1.experts": [2]}, freeze_base=False)
    assert list(adapters) == ["1.experts"] and adapters["1.experts"].experts == (2,)
    assert model[0].experts.lora is None
    assert all(p.requires_grad for name, p in model.named_parameters() if ".lora." not in name)
    with pytest.raises(ValueError, match="not GroupedExperts paths"):
        add_lora(model, rank=2, experts={"2.experts": [0]})
    with torch.no_grad():
        for p in adapters["1.experts"].parameters():
            p.normal_()
    x = torch.randn(5, 8)
    want = model(x).detach()
    remove_lora(model, merge=True)
    assert model[1].experts.lora is None
    torch.testing.assert_close(model(x).detach(), want, rtol=1e-4, atol=1e-4)
