"""flexmoe.hf.load_offloaded: experts on disk, greedy generation as in memory, the budget kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe.experts.store import SafetensorsExpertStore
from flexmoe.hf import load_offloaded, offload_stats, parse_bytes
from flexmoe.hf.offload import decode_linear_layers
from flexmoe.layer.offloaded import offloaded_cache
from tests.hf_tiny import MODELS, VOCAB, save_tiny_models, tiny_model

FAMILIES = sorted(MODELS)  # mixtral, qwen3_moe, qwen2_moe, olmoe, granitemoe, deepseek_v3, deepseek_v2


def expert_bytes(model, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one expert in ``dtype``, the largest top-k) of a ``transformers`` model."""
    block = next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj"))
    _, H, D = block.experts.gate_up_proj.shape
    F = block.experts.down_proj.shape[2]
    config = model.config
    top_k = getattr(config, "num_experts_per_tok", None) or config.top_k
    return (H * D + D * F) * dtype.itemsize, int(top_k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, FAMILIES)


def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def generate(model, ids: torch.Tensor, tokens: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_the_in_memory_model(saved, family, dtype):
    reference = AutoModelForCausalLM.from_pretrained(saved[family], dtype=dtype).eval()
    each, top_k = expert_bytes(reference, dtype)
    flexmoe.hf.convert(reference)  # flexmoe's router runs in fp32: the in-memory reference in bf16
    decode_linear_layers(reference)  # the offloaded model's linear layers decode on the row kernels
    ids = prompt()
    expected = generate(reference, ids)
    with torch.no_grad():
        expected_logits = reference(ids).logits
    for budget in (None, (top_k + 1) * each):  # unlimited, and a few experts of the 8 (or 4) per layer
        # confidence 0: every predicted expert is read ahead (these random routers are unsure of all)
        model = load_offloaded(saved[family], expert_budget=budget, dtype=dtype, prefetch_confidence=0.0)
        assert torch.equal(generate(model, ids), expected), (family, budget)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
        stats = offload_stats(model)
        assert stats.lookups > 0 and stats.hits + stats.misses == stats.lookups
        assert stats.reads > 0 and stats.bytes_read == stats.reads * each
        assert 0.0 <= stats.prefetch_precision <= 1.0 and 0.0 <= stats.prefetch_recall <= 1.0
        assert stats.predicted > 0
        if budget is not None:
            assert stats.peak_resident_bytes <= budget
            assert stats.evictions > 0
        assert not any(p.numel() for n, p in model.named_parameters() if "experts" in n and "shared" not in n)


def test_fp32_generation_equals_transformers(saved):
    plain = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"]).eval()
    model = load_offloaded(saved["qwen3_moe"], expert_budget="40KiB", dtype=torch.float32)
    assert torch.equal(generate(model, prompt()), generate(plain, prompt()))


def test_stacked_experts_on_disk(tmp_path):
    # A checkpoint holding transformers 5's own layout: experts.gate_up_proj [E, 2F, D].
    source = tiny_model("qwen3_moe", seed=1)
    source.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    model = load_offloaded(tmp_path, expert_budget="30KiB", dtype=torch.float32)
    flexmoe.hf.convert(source)
    assert torch.equal(generate(model, prompt()), generate(source, prompt()))


def test_prefill_reads_each_expert_once_per_layer(saved):
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"]).eval()
    each, top_k = expert_bytes(reference, torch.float32)
    model = load_offloaded(
        saved["qwen3_moe"], expert_budget=top_k * each, dtype=torch.float32, prefetch=False
    )
    with torch.no_grad():
        model(ids)
    used = sum(
        int((block.moe.stats.routed_per_expert > 0).sum())
        for block in model.modules()
        if isinstance(block, flexmoe.hf.FlexMoEBlock)
    )
    stats = offload_stats(model)
    assert used > 2 * top_k  # more experts than the budget holds at once
    assert stats.reads == stats.misses == stats.lookups == used


def test_too_small_a_budget_names_the_need(saved):
    reference = AutoModelForCausalLM.from_pretrained(saved["mixtral"])
    each, top_k = expert_bytes(reference, torch.float32)
    with pytest.raises(
        ValueError, match=rf"expert_budget=.*\({top_k * each - 1} bytes\) is too small.*top-{top_k}"
    ):
        load_offloaded(saved["mixtral"], expert_budget=top_k * each - 1, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"{top_k} x {each // 2} = {top_k * each // 2} bytes"):
        load_offloaded(saved["mixtral"], expert_budget=100, dtype=torch.bfloat16)


def test_policies_and_no_prefetch_are_exact(saved):
    ids = prompt()
    expected = generate(load_offloaded(saved["olmoe"], expert_budget=None), ids)
    for policy in ("lru", "lfu"):
        for prefetch in (False, True):
            model = load_offloaded(saved["olmoe"], expert_budget="40KiB", policy=policy, prefetch=prefetch)
            assert torch.equal(generate(model, ids), expected)
            stats = offload_stats(model)
            assert stats.prefetch_reads == 0 if not prefetch else stats.prefetch_reads >= 0
            assert stats.peak_resident_bytes <= 40 * 1024


def test_through_the_page_cache_or_past_it_alike(saved):
    ids = prompt()
    expected = generate(load_offloaded(saved["qwen3_moe"], expert_budget=None), ids)
    for direct_io in (False, True):
        model = load_offloaded(saved["qwen3_moe"], expert_budget="40KiB", direct_io=direct_io)
        assert torch.equal(generate(model, ids), expected)
        cache = offloaded_cache(model)
        assert cache is not None and isinstance(cache.store, SafetensorsExpertStore)
        assert cache.store.direct is direct_io


def test_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors"):
        load_offloaded(tmp_path)
    with pytest.raises(ValueError, match="policy"):
        load_offloaded(saved["mixtral"], policy="fifo")
    with pytest.raises(ValueError, match="direct_io must be True or False, got 'yes'"):
        load_offloaded(saved["mixtral"], direct_io="yes")
    with pytest.raises(ValueError, match="has no offloaded experts"):
        offload_stats(tiny_model("mixtral"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (1024, 1024),
        ("8GiB", 8 * 2**30),
        ("1.5GB", 1_500_000_000),
        (" 512 MiB ", 512 * 2**20),
        ("7", 7),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["8 gigs", "-1GiB", "0", "", "GiB"])
def test_parse_bytes_refuses(value):
    with pytest.raises(ValueError, match="expert_budget"):
        parse_bytes(value)


def test_a_top_k_override_beyond_the_budget(saved):
    reference = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"])
    each, top_k = expert_bytes(reference, torch.float32)
    model = load_offloaded(saved["qwen3_moe"], expert_budget=(top_k + 1) * each, dtype=torch.float32)
    block = next(m for m in model.modules() if isinstance(m, flexmoe.hf.FlexMoEBlock))
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        assert block.moe(x, top_k=top_k + 1).shape == x.shape
        with pytest.raises(ValueError, match=rf"top-{top_k + 2} experts in memory at once"):
            block.moe(x, top_k=top_k + 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(saved):
    reference = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"], dtype=torch.bfloat16).cuda().eval()
    each, top_k = expert_bytes(reference, torch.bfloat16)
    flexmoe.hf.convert(reference)
    model = load_offloaded(
        saved["qwen3_moe"], expert_budget=(top_k + 1) * each, dtype=torch.bfloat16, device="cuda"
    )
    ids = prompt().cuda()
    assert torch.equal(generate(model, ids), generate(reference, ids))
    assert offload_stats(model).peak_resident_bytes <= (top_k + 1) * each


RSS_SCRIPT = """
import gc, sys, torch, flexmoe.hf

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

packed = {"default": None, "plain": False}[sys.argv[2]]
ids = torch.randint(0, 128, (2, 32))
greedy = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
warm = flexmoe.hf.load_offloaded(sys.argv[1], expert_budget="8MiB", packed=packed)  # imports, allocator
warm.generate(ids, **greedy)
del warm
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
before = rss("VmRSS:")
model = flexmoe.hf.load_offloaded(sys.argv[1], expert_budget="8MiB", packed=packed)
model.generate(ids, **greedy)
print(rss("VmHWM:") - before, flexmoe.hf.offload_stats(model).bytes_read)
"""

MiB = 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("experts", ["default", "plain"])
def test_memory_stays_bounded(tmp_path, experts):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    expert = 3 * 256 * 512 * 4  # 1.5 MiB: w_in 1 MiB, w_out 0.5 MiB (fp32)
    experts_bytes = 4 * 16 * expert  # 96 MiB
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path), experts],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"},
    )
    grown, bytes_read = (int(v) for v in done.stdout.split())
    assert bytes_read > experts_bytes  # more than every expert passed through the 8 MiB cache
    limit = {
        # Plain experts are read into the memory of evicted ones: beyond the budget only the
        # spare buffers (at most 4 per weight size: 6 MiB here). Measured: 3-10 MiB in all.
        "plain": 8 * MiB + 4 * expert,
        # Packed experts (the default on a CPU with oneDNN) are new memory from the reading
        # threads, whose glibc malloc arenas keep freed copies; plus one 1 MiB read buffer
        # per reading thread (4 I/O threads and the caller's). Measured: 12-25 MiB in all.
        "default": experts_bytes // 3,
    }[experts]
    assert grown < limit, f"the process grew by {grown / MiB:.1f} MiB (limit {limit / MiB:.0f} MiB)"
