"""PEFT interoperability: LoRA adapters of converted ``transformers`` MoE models, both directions.

PEFT (``LoraConfig(target_parameters=[... gate_up_proj, ... down_proj])`` on the
unconverted model) is the oracle: an adapter flexmoe saves must load in PEFT with equal
logits, and an adapter PEFT saves must load into the converted model with equal logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from flexmoe import hf
from flexmoe.adapters import add_lora, load_peft_adapter, lora_adapters, merge_lora, save_peft_adapter
from tests.hf_tiny import VOCAB, tiny_model

MODEL = "qwen3_moe"
TARGETS = {
    ("w_in", "w_out"): ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ("w_out",): ["mlp.experts.down_proj"],
}


def input_ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def peft_model(targets: tuple[str, ...], rank: int = 4, alpha: int = 8) -> torch.nn.Module:
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=TARGETS[targets])
    model = get_peft_model(tiny_model(MODEL), config)
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("backend", ["fused", "loop"])
def test_flexmoe_adapter_loads_in_peft_with_equal_logits(tmp_path: Path, targets, backend: str) -> None:
    model = tiny_model(MODEL)
    hf.convert(model, backend=backend)
    add_lora(model, rank=4, alpha=8, experts=[1, 4, 6], targets=targets)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            for p in adapter.parameters():
                p.normal_(0.0, 0.2)
    want = logits(model)
    save_peft_adapter(model, tmp_path / "ours")

    # The files hold what PEFT itself writes for the same configuration: names, shapes, dtypes.
    peft_model(targets).save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.items()
    }

    loaded = PeftModel.from_pretrained(tiny_model(MODEL), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(tiny_model(MODEL)), want, atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("targets", list(TARGETS))
def test_peft_adapter_loads_into_converted_model_with_equal_logits(tmp_path: Path, targets) -> None:
    theirs = peft_model(targets)
    want = logits(theirs)
    theirs.save_pretrained(tmp_path)

    model = tiny_model(MODEL)
    hf.convert(model)
    adapters = load_peft_adapter(model, tmp_path)
    assert sorted(adapters) == ["model.layers.0.mlp.moe.experts", "model.layers.1.mlp.moe.experts"]
    assert all(a.targets == targets for a in adapters.values())
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in name for name in trainable)

    # and back: flexmoe writes the same values PEFT wrote
    save_peft_adapter(model, tmp_path / "again")
    again, first = (
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    assert again.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key])

    merge_lora(model)  # merged into the transformers Parameters: the plain model computes it
    torch.testing.assert_close(logits(hf.revert(model)), want, rtol=1e-4, atol=1e-4)


def test_peft_adapter_errors(tmp_path: Path) -> None:
    model = tiny_model(MODEL)
    with pytest.raises(ValueError, match="convert"):
        load_peft_adapter(model, tmp_path)
    hf.convert(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(model, tmp_path)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    get_peft_model(tiny_model(MODEL), config).save_pretrained(tmp_path / "attention")
    with pytest.raises(ValueError, match="does not adapt"):
        load_peft_adapter(model, tmp_path / "attention")
    other = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS[("w_out",)])
    get_peft_model(tiny_model(MODEL, num_experts=4), other).save_pretrained(tmp_path / "four_experts")
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(8, 24\), expected \(16, 24\)"):
        load_peft_adapter(model, tmp_path / "four_experts")
    assert not lora_adapters(model)  # refused before any block got an adapter
    add_lora(model, rank=2)
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        save_peft_adapter(model, tmp_path / "merged")
