"""Many adapters on one base (ExpertWeave): a mixed batch equals each adapter's own model, per sequence.

The reference for a sequence of adapter ``a`` is a separate copy of the base layer with
that adapter applied the plain way: its LoRA attached as an ``ExpertLoRA`` (the backends'
own LoRA path), or its ESFT experts written into the copy's expert weights. Outputs and
gradients (input and router) are compared; the base is never copied by the weave.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer
from flexmoe.adapters import (
    ESFTAdapter,
    ESFTExperts,
    ExpertWeave,
    add_lora,
    lora_adapters,
    merge_esft_adapter,
    remove_weave,
    use,
)

ACTIVATIONS = ["relu", "gelu", "silu", "swiglu", "geglu"]


@dataclass
class AdapterSpec:
    kind: str  # "lora" or "esft"
    experts: list[int]
    rank: int
    targets: tuple[str, ...]


@dataclass
class Case:
    E: int
    top_k: int
    D: int
    F: int
    activation: str
    bias: bool
    backend: str
    adapters: list[AdapterSpec]
    ids: list[int]
    S: int
    top_p: float | None
    prepared: bool  # the base experts' packed inference copies (prepare_for_inference)
    seed: int


@st.composite
def cases(draw) -> Case:
    E = draw(st.integers(2, 6))
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        specs.append(
            AdapterSpec(
                kind=draw(st.sampled_from(["lora", "esft"])),
                experts=draw(st.lists(st.integers(0, E - 1), min_size=1, max_size=E, unique=True)),
                rank=draw(st.sampled_from([1, 2, 4])),
                targets=draw(st.sampled_from([("w_in", "w_out"), ("w_in",), ("w_out",)])),
            )
        )
    B = draw(st.integers(1, 4))
    return Case(
        E=E,
        top_k=draw(st.integers(1, min(3, E))),
        D=draw(st.sampled_from([4, 8])),
        F=draw(st.sampled_from([4, 8])),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias=draw(st.booleans()),
        backend=draw(st.sampled_from(["loop", "fused", "grouped_mm"])),
        adapters=specs,
        ids=draw(st.lists(st.integers(-1, len(specs) - 1), min_size=B, max_size=B)),
        S=draw(st.integers(1, 4)),
        top_p=draw(st.sampled_from([None, None, 0.7])),
        prepared=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def build(case: Case) -> tuple[MoELayer, list[object], list[MoELayer]]:
    """The base layer, the adapters (as ``ExpertWeave.add_*`` take them), and each adapter's own layer."""
    torch.manual_seed(case.seed)
    base = MoELayer(
        case.D, case.F, case.E, case.top_k, activation=case.activation, bias=case.bias, backend=case.backend
    )
    base.set_routing(top_p=case.top_p)
    adapters: list[object] = []
    own: list[MoELayer] = []
    for spec in case.adapters:
        model = copy.deepcopy(base)
        if spec.kind == "lora":
            add_lora(
                model, spec.rank, alpha=3.0, experts=spec.experts, targets=spec.targets, freeze_base=False
            )
            with torch.no_grad():
                for p in model.experts.lora.parameters():
                    p.normal_(0.0, 0.5)
            adapters.append(lora_adapters(model))
        else:
            ids = sorted(spec.experts)
            e = base.experts
            esft = ESFTAdapter(
                {
                    "experts": ESFTExperts(
                        tuple(ids),
                        torch.randn(len(ids), *e.w_in.shape[1:]) * 0.5,
                        torch.randn(len(ids), *e.w_out.shape[1:]) * 0.5,
                        None if e.b_in is None else torch.randn(len(ids), e.b_in.shape[1]),
                        None if e.b_out is None else torch.randn(len(ids), e.b_out.shape[1]),
                    )
                }
            )
            merge_esft_adapter(model, esft)
            adapters.append(esft)
        own.append(model.eval())
    return base, adapters, own


def weave(base: MoELayer, adapters: list[object]) -> ExpertWeave:
    woven = ExpertWeave(base)
    for adapter in adapters:
        if isinstance(adapter, ESFTAdapter):
            woven.add_esft(adapter)
        else:
            woven.add_lora(adapter)  # type: ignore[arg-type]
    return woven


@given(cases())
@settings(max_examples=60, deadline=None)
def test_mixed_batch_equals_each_adapters_own_model(case: Case) -> None:
    base, adapters, own = build(case)
    plain = copy.deepcopy(base).eval()
    weave(base, adapters)
    base.eval()
    B = len(case.ids)
    x = torch.randn(B, case.S, case.D, requires_grad=True)
    grad_y = torch.randn(B, case.S, case.D)
    with use(base, case.ids):
        y = base(x)
    (y * grad_y).sum().backward()
    if case.prepared:  # the inference pass then runs the base experts on their packed copies
        base.experts.prepare_for_inference()
    with torch.no_grad(), use(base, case.ids):  # without autograd: the fused backend's own pass
        y_inference = base(x)
    torch.testing.assert_close(y_inference, y, rtol=1e-4, atol=1e-5)
    for b, a in enumerate(case.ids):
        model = plain if a < 0 else own[a]
        x_b = x[b : b + 1].detach().requires_grad_()
        y_b = model(x_b)
        (y_b * grad_y[b : b + 1]).sum().backward()
        torch.testing.assert_close(y[b], y_b[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x.grad[b], x_b.grad[0], rtol=1e-4, atol=1e-5)
    # The router is shared: its gradient is the sum of the per-sequence models' gradients.
    expected = sum(m.router.weight.grad for m in [plain, *own] if m.router.weight.grad is not None)
    torch.testing.assert_close(base.router.weight.grad, expected, rtol=1e-4, atol=1e-5)


@given(cases())
@settings(max_examples=40, deadline=None)
def test_mixed_bf16_inference_equals_each_adapters_own_bf16_model(case: Case) -> None:
    """bf16 on CPU: experts without LoRA rows may run whole on the row kernels, the others apart."""
    case.backend, case.prepared = "fused", False
    base, adapters, own = build(case)
    plain = copy.deepcopy(base).to(torch.bfloat16).eval()
    weave(base.to(torch.bfloat16), adapters)
    base.eval()
    x = torch.randn(len(case.ids), case.S, case.D).to(torch.bfloat16)
    with torch.no_grad(), use(base, case.ids):
        y = base(x)
    for b, a in enumerate(case.ids):
        model = plain if a < 0 else own[a].to(torch.bfloat16)
        with torch.no_grad():
            y_b = model(x[b : b + 1])[0].float()
        # both round to bf16 at different steps: a few bf16 steps of the largest value
        torch.testing.assert_close(y[b].float(), y_b, rtol=0.0, atol=0.04 * float(y_b.abs().max()) + 1e-3)


@given(cases())
@settings(max_examples=15, deadline=None)
def test_base_rows_only_run_the_layer_as_before(case: Case) -> None:
    base, adapters, _ = build(case)
    plain = copy.deepcopy(base)
    weave(base, adapters)
    x = torch.randn(len(case.ids), case.S, case.D)
    with torch.no_grad(), use(base, [-1] * len(case.ids)):
        assert torch.equal(base(x), plain(x))
    with torch.no_grad():
        assert torch.equal(base(x), plain(x))  # outside ``use``: the base model


def test_memory_is_base_plus_the_adapters_own_parameters() -> None:
    torch.manual_seed(0)
    base = MoELayer(32, 48, 16, top_k=4)
    state_before = {name: (t.data_ptr(), t.numel()) for name, t in base.state_dict(keep_vars=True).items()}
    bytes_before = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    adapter_bytes = 0
    woven = ExpertWeave(base)
    for i in range(6):
        model = copy.deepcopy(base)
        if i % 2 == 0:
            loras = add_lora(model, rank=8, alpha=16, experts=list(range(i, 16, 3)))
            adapter_bytes += sum(p.numel() * p.element_size() for m in loras.values() for p in m.parameters())
            woven.add_lora(loras)
        else:
            ids = tuple(range(i, 16, 4))
            e = base.experts
            esft = ESFTAdapter(
                {"experts": ESFTExperts(ids, e.w_in[list(ids)] + 1.0, e.w_out[list(ids)] - 1.0)}
            )
            adapter_bytes += esft.num_bytes()
            woven.add_esft(esft)
    assert woven.adapter_bytes() == adapter_bytes
    lora_ptrs = {p.untyped_storage().data_ptr() for m in loras.values() for p in m.parameters()}
    weave_ptrs = {t.untyped_storage().data_ptr() for w in woven.layers.values() for t in w.tensors()}
    assert not lora_ptrs & weave_ptrs  # the weave holds its own copies
    assert woven.index_bytes() == (6 + 1) * 16 * 8
    # No copy of the base: same tensors, same storage, nothing added to the layer's state.
    state_after = {name: (t.data_ptr(), t.numel()) for name, t in base.state_dict(keep_vars=True).items()}
    assert state_after == state_before
    assert sum(t.numel() * t.element_size() for t in base.state_dict().values()) == bytes_before
    base_ptrs = {t.untyped_storage().data_ptr() for t in base.state_dict().values()}
    assert not base_ptrs & {
        t.untyped_storage().data_ptr() for w in woven.layers.values() for t in w.tensors()
    }


def test_adapter_ids_are_checked() -> None:
    torch.manual_seed(0)
    base = MoELayer(8, 8, 4, top_k=2)
    model = copy.deepcopy(base)
    woven = ExpertWeave(base)
    woven.add_lora(add_lora(model, rank=2))
    with (
        pytest.raises(ValueError, match=r"adapter_ids must be -1 \(the base\) or ids in \[0, 1\), got \[1\]"),
        use(base, [0, 1]),
    ):
        pass
    with pytest.raises(ValueError, match="3 sequences do not divide the 8 tokens"), use(base, [0, 0, -1]):
        base(torch.randn(8, 8))
    with (
        pytest.raises(ValueError, match="capacity_factor: multi-adapter batches run dropless"),
        use(base, [0]),
    ):
        base(torch.randn(8, 8), capacity_factor=1.0)
    with pytest.raises(ValueError, match="already has an expert resolver"):
        ExpertWeave(base)
    remove_weave(base)
    with pytest.raises(ValueError, match="the model has no ExpertWeave"), use(base, [0]):
        pass
    add_lora(base, rank=2)
    with pytest.raises(ValueError, match="unmerged LoRA adapter attached"):
        ExpertWeave(base)


def test_use_restores_the_previous_ids() -> None:
    torch.manual_seed(0)
    base = MoELayer(8, 8, 4, top_k=2)
    plain = copy.deepcopy(base)
    woven = ExpertWeave(base)
    model = copy.deepcopy(base)
    merge_esft_adapter(
        model,
        esft := ESFTAdapter({"experts": ESFTExperts((1, 2), torch.randn(2, 16, 8), torch.randn(2, 8, 8))}),
    )
    woven.add_esft(esft)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        with use(base, [0, 0]):
            with use(base, [-1, None]):
                torch.testing.assert_close(base(x), plain(x))
            torch.testing.assert_close(base(x), model(x))
        torch.testing.assert_close(base(x), plain(x))


def test_compiled_model_runs_the_weave_eagerly() -> None:
    torch.manual_seed(0)
    base = MoELayer(8, 8, 4, top_k=2)
    model = copy.deepcopy(base).eval()
    add_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for p in model.experts.lora.parameters():
            p.normal_()
    ExpertWeave(base).add_lora(lora_adapters(model))
    compiled = torch.compile(base)
    x = torch.randn(2, 3, 8)
    for ids in ([0, -1], [-1, 0], [-1, -1]):
        with torch.no_grad(), use(base, ids):
            torch.testing.assert_close(compiled(x), base(x))
        with torch.no_grad():
            reference = torch.cat(
                [model(x[b : b + 1]) if a == 0 else compiled(x[b : b + 1]) for b, a in enumerate(ids)]
            )
        with torch.no_grad(), use(base, ids):
            torch.testing.assert_close(compiled(x), reference, rtol=1e-4, atol=1e-5)
