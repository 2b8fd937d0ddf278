"""Int8 experts: quantization error, the int8 expert FFN against an fp64 reference, quantized checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe.experts.int8 import Int8Linear, Int8Weight, int8_linear, quantize_int8
from flexmoe.experts.served import served_expert_ffn
from flexmoe.hf import load_offloaded, offload_stats, quantize_experts, quantize_linear_layers
from flexmoe.hf.quantize import TensorSpec, write_safetensors
from flexmoe.layer import MoELayer
from flexmoe.layer import offloaded as offloaded_module
from flexmoe.layer.offloaded import int8_experts_in_memory
from flexmoe.models import TinyMoELM, TinyMoELMConfig
from tests.hf_tiny import VOCAB, tiny_model

ACTIVATIONS = ["silu", "gelu", "relu", "swiglu", "geglu"]


def reference_ffn(x, w_in, w_out, activation, row_weights):
    """The expert in fp64 from dequantized weights: ``(act(x w_in^T) * r) w_out^T``."""
    x64 = x.double()
    h = x64 @ w_in.dequantize(torch.float64).T
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    else:
        a = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation](h)
    return (a * row_weights.double()[:, None]) @ w_out.dequantize(torch.float64).T


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
    zero_row=st.booleans(),
)
def test_quantization_error_is_at_most_half_a_step(rows, cols, scale, seed, zero_row):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if zero_row:
        w[0] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (rows,)
    assert int(q.abs().max()) <= 127
    amax = w.abs().amax(dim=1)
    torch.testing.assert_close(s[amax > 0], amax[amax > 0] / 127)
    error = (w.double() - q.double() * s.double()[:, None]).abs()
    assert bool((error <= s.double()[:, None] / 2 * (1 + 1e-6)).all())
    if zero_row:
        assert not q[0].any()


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 7),
    D=st.sampled_from([1, 5, 16, 23, 32, 48]),  # multiples of 16: the 16-bit int8 kernel too
    F_=st.sampled_from([1, 7, 8, 16, 20, 32]),
    activation=st.sampled_from(ACTIVATIONS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_int8_expert_equals_dequantized_fp64_reference(tokens, D, F_, activation, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    H = 2 * F_ if activation in ("swiglu", "geglu") else F_
    w_in = Int8Weight.quantize(torch.randn(H, D, generator=generator))
    w_out = Int8Weight.quantize(torch.randn(D, F_, generator=generator))
    x = torch.randn(tokens, D, generator=generator).to(dtype)
    row_weights = torch.rand(tokens, generator=generator)
    y = served_expert_ffn(x, w_in, w_out, activation, row_weights)
    assert y.dtype == dtype and y.shape == (tokens, D)
    expected = reference_ffn(x, w_in, w_out, activation, row_weights)
    scale = 1 + expected.abs().max().item() if tokens else 1
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=tolerance * scale)


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 6),
    width=st.sampled_from([1, 3, 8, 16, 17, 32, 64]),
    outputs=st.integers(1, 17),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_reads_the_int8_values(tokens, width, outputs, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = Int8Weight.quantize(torch.randn(outputs, width, generator=generator))
    x = torch.randn(tokens, width, generator=generator).to(dtype)
    expected = x.double() @ (weight.q.double() * weight.scale.to(dtype).double()[:, None]).T
    y = int8_linear(x, weight)
    assert y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        y.double(), expected, rtol=0, atol=tolerance * (1 + expected.abs().max().item())
    )


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),  # the int8 row kernel (up to 16 bf16 rows), PyTorch's int8 kernel beyond
    width=st.sampled_from([3, 16, 17, 48]),  # 3, 17: widths PyTorch's kernel refuses (dequantized)
    outputs=st.integers(1, 12),
    bias=st.booleans(),
    leading=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_layer_equals_the_dequantized_fp64_layer(
    rows, width, outputs, bias, leading, dtype, seed
):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(width, outputs, bias=bias).to(dtype)
    layer = Int8Linear.of(linear)
    assert (layer.in_features, layer.out_features) == (width, outputs) and layer.q.dtype == torch.int8
    shape = (1, rows, width) if leading else (rows, width)
    x = torch.randn(shape, generator=generator).to(dtype)
    w64 = layer.weight.dequantize(torch.float64)
    # the quantized weight is off by at most half a step per element
    assert ((w64 - linear.weight.double()).abs() <= layer.scale.double()[:, None] / 2 + 1e-7).all()
    expected = x.double() @ w64.t() + (0 if linear.bias is None else linear.bias.double())
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], outputs) and y.dtype == dtype
    # fp32: sums in fp32; bf16: the output, a 16-bit fixed-point row and a bias each rounded once
    step = 1e-6 if dtype == torch.float32 else 2**-7
    bound = step * (x.double().abs() @ w64.abs().t() + expected.abs()) + 1e-6
    assert ((y.double() - expected).abs() <= bound).all()


def test_int8_linear_layer_gradients_are_the_dequantized_layers():
    linear = torch.nn.Linear(16, 5)
    layer = Int8Linear.of(linear)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, layer.weight.dequantize(), linear.bias)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantize_linear_layers_leaves_a_tied_head(tmp_path):
    model = tiny_model("qwen3_moe").eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert quantize_linear_layers(model) == len(linears) - 1  # all but the head
    assert type(model.lm_head) is torch.nn.Linear
    assert all(type(m) is not torch.nn.Linear for m in model.model.layers.modules())


def test_int8_weight_checks_its_shapes():
    with pytest.raises(ValueError, match="q must be a 2-d int8 tensor"):
        Int8Weight(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"scale must have shape \(2,\)"):
        Int8Weight(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8(torch.zeros(2, 3, dtype=torch.int32))


# ------------------------------------------------------------------ checkpoints


def dequantized_reference(directory, dtype=torch.float32):
    """The in-memory model with every routed expert weight replaced by its int8 round trip."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            experts = getattr(module, "experts", None)
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(experts, name, None)
                if isinstance(w, torch.Tensor) and w.dim() == 3:
                    q, s = quantize_int8(w)
                    w.copy_(q.float() * s.unsqueeze(-1))
    flexmoe.hf.convert(model)
    return model


def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def generate(model, ids, tokens=8):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )


def expert_shape(model) -> tuple[int, int, int, int]:
    """``(H, D, F, top_k)`` of a ``transformers`` MoE model."""
    block = next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj"))
    _, H, D = block.experts.gate_up_proj.shape
    config = model.config
    return (
        H,
        D,
        block.experts.down_proj.shape[2],
        int(getattr(config, "num_experts_per_tok", 0) or config.top_k),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (the bf16-free fp32 save_pretrained directory, its int8 copy)."""
    out = {}
    for family in ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"):
        source = tmp_path_factory.mktemp(f"{family}-src")
        tiny_model(family).save_pretrained(source, max_shard_size="40KB")
        target = tmp_path_factory.mktemp(f"{family}-int8") / "int8"
        copy = quantize_experts(source, target)
        assert copy.path == target and copy.tensors > 0
        out[family] = (source, target)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_int8_checkpoint_equals_the_dequantized_model(checkpoints, family):
    source, target = checkpoints[family]
    H, D, F_, top_k = expert_shape(AutoModelForCausalLM.from_pretrained(source))
    reference = dequantized_reference(source)
    ids = prompt()
    expected = generate(reference, ids)
    with torch.no_grad():
        expected_logits = reference(ids).logits
    int8_bytes = H * D + D * F_ + 4 * (H + D)
    for budget in (None, (top_k + 1) * int8_bytes):
        model = load_offloaded(target, expert_budget=budget, dtype=torch.float32)
        assert torch.equal(generate(model, ids), expected), (family, budget)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-4, atol=1e-4)
        stats = offload_stats(model)
        assert stats.reads > 0 and stats.bytes_read == stats.reads * int8_bytes
        if budget is not None:
            assert stats.peak_resident_bytes <= budget and stats.evictions > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_layers_offloaded_equal_the_quantized_in_memory_model(checkpoints, dtype):
    source, _ = checkpoints["qwen3_moe"]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    flexmoe.hf.convert(reference)
    assert quantize_linear_layers(reference) > 0
    model = load_offloaded(source, expert_budget=None, dtype=dtype, int8_linear=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    assert torch.equal(generate(model, prompt()), generate(reference, prompt()))
    with pytest.raises(ValueError, match="int8_linear must be True or False"):
        load_offloaded(source, int8_linear=1)


def test_int8_experts_decode_in_one_call_as_one_at_a_time(checkpoints, monkeypatch):
    # a decode step's resident int8 experts run in one call of the row kernels: the same bits
    _, target = checkpoints["qwen3_moe"]
    ids = prompt()
    calls = []
    together_call = offloaded_module.experts_int8_at

    def counted(*args, **kwargs):
        calls.append(1)
        return together_call(*args, **kwargs)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model = load_offloaded(target, expert_budget=None, dtype=torch.bfloat16)
        with torch.no_grad():
            return generate(model, ids), model(ids).logits

    monkeypatch.setattr(offloaded_module, "experts_int8_at", counted)
    together = run()
    assert calls, "no step ran its int8 experts in one call"
    monkeypatch.setattr(offloaded_module, "experts_int8_at", lambda *args: False)  # each expert alone
    one_at_a_time = run()
    assert torch.equal(together[0], one_at_a_time[0])
    assert torch.equal(together[1], one_at_a_time[1])


def test_int8_reads_half_the_bytes_of_bf16(checkpoints):
    source, target = checkpoints["qwen3_moe"]
    ids = prompt()
    read = {}
    for name, directory in (("bf16", source), ("int8", target)):
        model = load_offloaded(directory, expert_budget=None, dtype=torch.bfloat16, prefetch=False)
        with torch.no_grad():
            model(ids)
        stats = offload_stats(model)
        read[name] = (stats.reads, stats.bytes_read)
    assert read["int8"][0] == read["bf16"][0]  # the same experts ran (routing in fp32 on the same weights)
    H, D, F_, _ = expert_shape(AutoModelForCausalLM.from_pretrained(source))
    ratio = read["int8"][1] / read["bf16"][1]
    assert ratio == pytest.approx((H * D + D * F_ + 4 * (H + D)) / (2 * (H * D + D * F_)))
    assert ratio < 0.6  # here D = 32: the fp32 scales are 10 % of int8; at D = 2048 they are 0.1 %


def test_the_copy_keeps_everything_but_the_experts(checkpoints):
    source, target = checkpoints["qwen2_moe"]
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert (target / "config.json").read_text() == (source / "config.json").read_text()
    scales = {key for key in index if key.endswith("_scale")}
    assert set(index) - scales == set(source_index)
    int8 = 0
    for key, file in source_index.items():
        with safe_open(source / file, "pt") as before, safe_open(target / index[key], "pt") as after:
            old, new = before.get_tensor(key), after.get_tensor(key)
            if key + "_scale" in index:
                int8 += 1
                assert new.dtype == torch.int8 and ".experts." in key and "shared_expert" not in key
                scale = after.get_tensor(key + "_scale")
                assert bool(((old - new.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7).all())
            else:
                assert torch.equal(old, new), key  # shared experts, attention, router: unchanged
    assert int8 == 2 * 3 * 8  # 2 layers x 8 experts x (gate, up, down)


def test_stacked_experts_quantized(tmp_path):
    # transformers 5's own layout: experts.gate_up_proj [E, 2F, D], scales [E, 2F]
    source = tiny_model("qwen3_moe", seed=1)
    source.config.save_pretrained(tmp_path / "src")
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "src" / "model.safetensors"
    )
    quantize_experts(tmp_path / "src", tmp_path / "int8")
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as file:
        assert file.get_slice("model.layers.0.mlp.experts.gate_up_proj_scale").get_shape() == [8, 48]
    model = load_offloaded(tmp_path / "int8", expert_budget="30KiB", dtype=torch.float32)
    assert torch.equal(generate(model, prompt()), generate(dequantized_reference(tmp_path / "src"), prompt()))


def test_quantize_errors(checkpoints, tmp_path):
    source, target = checkpoints["mixtral"]
    with pytest.raises(ValueError, match="dst must be a new or empty directory"):
        quantize_experts(source, target)
    with pytest.raises(ValueError, match="dst must differ from src"):
        quantize_experts(source, source)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        quantize_experts(tmp_path / "missing", tmp_path / "out")
    # an int8 expert without its scales is refused by the loader
    (tmp_path / "broken").mkdir()
    model = tiny_model("qwen3_moe")
    model.config.save_pretrained(tmp_path / "broken")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(8, 48, 32, dtype=torch.int8)
    save_file(tensors, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(ValueError, match=r"gate_up_proj in .* is int8 without .*gate_up_proj_scale"):
        load_offloaded(tmp_path / "broken")


def test_write_safetensors_checks_what_it_writes(tmp_path):
    specs = [TensorSpec("a", torch.bfloat16, (2, 3)), TensorSpec("b", torch.int8, (4,))]
    a, b = torch.randn(2, 3).bfloat16(), torch.arange(4, dtype=torch.int8)
    write_safetensors(tmp_path / "x.safetensors", specs, iter([a, b]))
    with safe_open(tmp_path / "x.safetensors", "pt") as file:
        assert torch.equal(file.get_tensor("a"), a) and torch.equal(file.get_tensor("b"), b)
    with pytest.raises(ValueError, match="the header says"):
        write_safetensors(tmp_path / "y.safetensors", specs, iter([a, a]))
    with pytest.raises(ValueError, match="2 tensors in the header, 1 given"):
        write_safetensors(tmp_path / "z.safetensors", specs, iter([a]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_experts_on_cuda(checkpoints):
    # the dequantize-on-use path: the same tokens as the dequantized in-memory model on the GPU
    source, target = checkpoints["qwen3_moe"]
    reference = dequantized_reference(source).cuda()
    model = load_offloaded(target, expert_budget="40KiB", dtype=torch.float32, device="cuda")
    ids = prompt().cuda()
    assert torch.equal(generate(model, ids), generate(reference, ids))


# ------------------------------------------------------------------ in memory


def test_int8_in_memory_equals_the_dequantized_model(checkpoints):
    source, _ = checkpoints["deepseek_v3"]  # a dense first layer, shared experts, a selection bias
    H, D, F_, _ = expert_shape(AutoModelForCausalLM.from_pretrained(source))
    reference = dequantized_reference(source)
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    flexmoe.hf.convert(model)
    store = int8_experts_in_memory(model)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    experts = len(layers) * layers[0].config.num_experts
    assert store.total_bytes == experts * (H * D + D * F_ + 4 * (H + D))
    emptied = [p for n, p in model.named_parameters() if ".experts.w_" in n]
    assert len(emptied) == 2 * len(layers) and not any(p.numel() for p in emptied)
    ids = prompt()
    assert torch.equal(generate(model, ids), generate(reference, ids))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_int8_in_memory_on_a_flexmoe_model():
    torch.manual_seed(0)
    model = TinyMoELM(TinyMoELMConfig(dim=32, num_layers=2, num_experts=4, expert_hidden_dim=48, context=16))
    model.eval()
    tokens = torch.randint(0, 256, (2, 16))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in reference.moe_layers():
            for weight in (layer.experts.w_in, layer.experts.w_out):
                q, scale = quantize_int8(weight)
                weight.copy_(q.float() * scale.unsqueeze(-1))
        expected = reference(tokens)
        int8_experts_in_memory(model)
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="has no MoELayer"):
        int8_experts_in_memory(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="single-device MoELayers"):
        int8_experts_in_memory(model)  # already int8
