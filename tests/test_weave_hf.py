"""ESFT and ExpertWeave on a converted ``transformers`` model: fine-tune, save, serve many, ``generate``."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import flexmoe.hf
from flexmoe.adapters import (
    ExpertWeave,
    add_lora,
    esft_prepare,
    esft_select,
    load_esft_adapter,
    lora_adapters,
    merge_esft_adapter,
    remove_weave,
    save_esft_adapter,
    use,
)

CONFIG = Qwen3MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


def converted():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG).eval()
    flexmoe.hf.convert(model)
    return model


def test_fine_tune_save_and_serve_many_with_generate(tmp_path) -> None:
    base = converted()
    task = torch.randint(1, 64, (4, 12))
    # 1. ESFT: choose, train only the chosen experts, save just them
    tuned = copy.deepcopy(base)
    selection = esft_select(tuned, [task], threshold=0.6, score="token")
    assert set(selection) == {f"model.layers.{i}.mlp.moe.experts" for i in range(2)}
    esft = esft_prepare(tuned, selection)
    optimizer = torch.optim.AdamW(esft.parameters(), lr=1e-2)
    for _ in range(2):
        loss = tuned(task, labels=task).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_esft_adapter(esft, tmp_path / "esft")
    # 2. LoRA adapters trained elsewhere (random factors stand in for training)
    lora_models = []
    for seed in (1, 2):
        model = copy.deepcopy(base)
        add_lora(model, rank=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora." in name:
                    p.normal_(0.0, 0.2)
        lora_models.append(model)
    # 3. serve all three on the one base
    merged = copy.deepcopy(base)
    loaded = load_esft_adapter(tmp_path / "esft")
    merge_esft_adapter(merged, loaded)
    weave = ExpertWeave(base)
    ids = {
        "lora1": weave.add_lora(lora_adapters(lora_models[0])),
        "esft": weave.add_esft(loaded),
        "lora2": weave.add_lora(lora_adapters(lora_models[1])),
    }
    own = {"lora1": lora_models[0], "esft": merged, "lora2": lora_models[1], "base": converted()}
    rows = ["esft", "base", "lora2", "lora1", "esft"]
    prompts = torch.randint(1, 64, (len(rows), 6))
    adapter_ids = [ids.get(name, -1) for name in rows]
    with torch.no_grad(), use(base, adapter_ids):
        logits = base(prompts).logits
        generated = base.generate(prompts, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        for b, name in enumerate(rows):
            torch.testing.assert_close(
                logits[b], own[name](prompts[b : b + 1]).logits[0], rtol=1e-4, atol=1e-4
            )
            alone = own[name].generate(prompts[b : b + 1], max_new_tokens=5, do_sample=False)
            assert torch.equal(generated[b], alone[0]), name
    remove_weave(base)
    with torch.no_grad():
        torch.testing.assert_close(base(prompts).logits, own["base"](prompts).logits)
