"""Experts computed from weights as a cache serves them: packed (oneDNN) against the plain math."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe.experts.int8 import Int8Weight
from flexmoe.experts.kernels import bf16_max_rows, decodes_plain
from flexmoe.experts.packed import PackedLinear, PackedWeight, packed_inference_supported
from flexmoe.experts.rows import RowsLinear, rows_bf16
from flexmoe.experts.served import served_expert_ffn, served_linear
from flexmoe.experts.store import SafetensorsExpertStore
from flexmoe.hf import load_offloaded, quantize_experts
from flexmoe.hf.offload import decode_linear_layers, pack_linear_layers
from flexmoe.layer.offloaded import offloaded_cache
from tests.hf_tiny import VOCAB, tiny_model

CPU = torch.device("cpu")
ACTIVATIONS = ["silu", "gelu", "relu", "swiglu", "geglu"]
DTYPES = [d for d in (torch.float32, torch.bfloat16) if packed_inference_supported(CPU, d)]
pytestmark = pytest.mark.skipif(not DTYPES, reason="no oneDNN packed matmuls on this CPU")


def reference_ffn(x, w_in, w_out, activation, row_weights):
    """The expert in fp64 from the plain weights: ``(act(x w_in^T) * r) w_out^T``."""
    h = x.double() @ w_in.double().T
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    else:
        a = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation](h)
    return (a * row_weights.double()[:, None]) @ w_out.double().T


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 40),
    D=st.sampled_from([1, 5, 16, 23, 64]),
    F_=st.sampled_from([1, 7, 16, 20, 48]),
    activation=st.sampled_from(ACTIVATIONS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_packed_expert_equals_the_plain_fp64_reference(tokens, D, F_, activation, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    H = 2 * F_ if activation in ("swiglu", "geglu") else F_
    w_in = torch.randn(H, D, generator=generator).to(dtype)
    w_out = torch.randn(D, F_, generator=generator).to(dtype)
    x = torch.randn(tokens, D, generator=generator).to(dtype)
    row_weights = torch.rand(tokens, generator=generator)
    packed_in, packed_out = PackedWeight.pack(w_in), PackedWeight.pack(w_out)
    assert packed_in.shape == (H, D) and packed_in.nbytes == w_in.numel() * w_in.element_size()
    y = served_expert_ffn(x, packed_in, packed_out, activation, row_weights)
    assert y.dtype == dtype and y.shape == (tokens, D)
    expected = reference_ffn(x, w_in, w_out, activation, row_weights)
    scale = 1 + expected.abs().max().item() if tokens else 1
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=tolerance * scale)
    plain = served_expert_ffn(x, w_in, w_out, activation, row_weights)
    torch.testing.assert_close(plain.double(), expected, rtol=0, atol=tolerance * scale)


def test_packed_linear_casts_the_input_to_the_weights_dtype():
    w = torch.randn(6, 16)
    x = torch.randn(3, 16, dtype=torch.float64)
    y = served_linear(x, PackedWeight.pack(w))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ w.T, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_moe")
    tiny_model("qwen3_moe").save_pretrained(directory)
    return directory


def served_weights(model) -> list:
    """What the model's cache is handed for each expert it holds."""
    cache = offloaded_cache(model)
    return [cache.store.read(key) for key in sorted(cache.resident())]


@contextlib.contextmanager
def packed_products_only() -> Iterator[None]:
    """A prepared model's experts computed on their packed copies alone, no row kernels."""
    with (
        mock.patch("flexmoe.experts.decoding.takes_experts_bf16", return_value=False),
        mock.patch("flexmoe.experts.decoding.takes_bf16_segments", return_value=False),
        mock.patch("flexmoe.experts.backends.takes_bf16", return_value=False),
        mock.patch("flexmoe.experts.packed.decodes_plain", return_value=False),
    ):
        yield


def greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offloaded_experts_are_packed_where_supported(saved, dtype):
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
    flexmoe.hf.convert(reference)
    # the in-memory model computing as each offloaded one does: packed experts, or the row kernels
    prepared = copy.deepcopy(reference)
    for layer in prepared.modules():
        if isinstance(layer, flexmoe.MoELayer):
            assert layer.prepare_for_inference()
    with packed_products_only():
        expected = {"packed": greedy(prepared, ids)}
    expected["plain"] = greedy(reference, ids)
    decode_linear_layers(reference)
    expected["rows"] = greedy(reference, ids)
    rows = decodes_plain(dtype)  # the row kernels decode plain weights: nothing needs packing
    plain = ("rows", torch.Tensor, RowsLinear) if rows else ("plain", torch.Tensor, torch.nn.Linear)
    for packed, (computed, kind, linear) in (
        (None, plain if rows else ("packed", PackedWeight, PackedLinear)),
        (True, ("packed", PackedWeight, PackedLinear)),
        (False, plain),
    ):
        model = load_offloaded(saved, expert_budget=None, dtype=dtype, packed=packed)
        assert torch.equal(greedy(model, ids), expected[computed]), packed
        weights = served_weights(model)
        assert weights and all(isinstance(w, kind) for pair in weights for w in pair)
        assert type(model.model.layers[0].self_attn.q_proj) is linear
        assert type(model.lm_head) is linear


def test_int8_experts_stay_int8_and_the_linear_layers_are_packed(saved, tmp_path):
    quantize_experts(saved, tmp_path / "int8")
    model = load_offloaded(tmp_path / "int8", expert_budget=None, packed=True)
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    greedy(model, ids)
    assert all(isinstance(w, Int8Weight) for pair in served_weights(model) for w in pair)
    assert any(isinstance(m, PackedLinear) for m in model.modules())


def test_packed_is_refused_where_it_cannot_run(saved):
    with pytest.raises(ValueError, match=r"packed: needs a CPU with oneDNN torch.float16 matmuls"):
        load_offloaded(saved, dtype=torch.float16, packed=True)
    with pytest.raises(ValueError, match="pack: packed experts need"):
        SafetensorsExpertStore({}, torch.float16, "cpu", pack=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head"])
def test_pack_linear_layers_equals_the_plain_layers(dtype, tied):
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", tie_word_embeddings=tied).to(dtype)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
        packed = pack_linear_layers(model)
        logits = model(ids).logits
    assert packed == len(linears) - tied  # a head tied to the embedding stays as it is
    assert isinstance(model.lm_head, torch.nn.Linear) is tied
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-head"])
def test_decode_linear_layers_keep_the_parameters_and_the_results(dtype, tied):
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe", tie_word_embeddings=tied).to(dtype)
    linears = {name: m.weight for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    replaced = decode_linear_layers(model)
    assert replaced == (len(linears) if decodes_plain(dtype) else 0)
    for name, module in model.named_modules():
        if name in linears:
            assert module.weight is linears[name]  # the same Parameter: tied weights stay tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


@pytest.mark.skipif(not decodes_plain(torch.bfloat16), reason="needs the bf16 row kernels (AVX512-BF16)")
@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    inputs=st.integers(1, 70),
    outputs=st.integers(1, 40),
    bias=st.booleans(),
    leading=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rows_linear_equals_the_linear_layer(rows, inputs, outputs, bias, leading, seed):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(inputs, outputs, bias=bias).to(torch.bfloat16)
    layer = RowsLinear.of(linear)
    shape = (1, rows, inputs) if leading else (rows, inputs)
    x = torch.randn(shape, generator=generator).to(torch.bfloat16)
    w64 = linear.weight.double()
    expected = x.double() @ w64.t() + (0 if linear.bias is None else linear.bias.double())
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], outputs) and y.dtype == torch.bfloat16
    # fp32 sums rounded to bf16 (a bias added after that rounding: two roundings)
    bound = 2 * 2**-8 * (x.double().abs() @ w64.abs().t() + expected.abs()) + 1e-30
    assert ((y.double() - expected).abs() <= bound).all()
    if rows <= bf16_max_rows():  # decoding rows: the row kernel's own result
        kernel = rows_bf16(x.reshape(rows, inputs), linear.weight)
        if linear.bias is not None:
            kernel += linear.bias
        assert torch.equal(y.reshape(rows, outputs), kernel)
    # with a gradient to compute it is the linear layer itself
    x_layer, x_linear = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.testing.assert_close(layer(x_layer), linear(x_linear), rtol=0, atol=0)
    layer(x_layer).float().sum().backward()
    linear(x_linear).float().sum().backward()
    assert torch.equal(x_layer.grad, x_linear.grad)
