"""Tiny random-weight ``transformers`` MoE models and blocks for the ``flexmoe.hf`` tests (no downloads)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexmoe.experts import grouped_mm_available

VOCAB = 101

# Every expert GEMM backend that runs here (``grouped_mm`` where ``torch._grouped_mm`` does):
# the equivalence tests run on each, so that a backend-specific bug fails a named test.
EXPERT_BACKENDS: list[str] = ["auto", "fused", "loop"] + (
    ["grouped_mm"] if grouped_mm_available(torch.device("cpu"), torch.float32) else []
)

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": None,
    "bos_token_id": None,
}
_MLA: dict[str, Any] = {  # DeepSeek attention, tiny; layer 0 dense, layers 1-2 MoE
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
}

# model_type -> config overrides: every family whose whole model the tests build.
MODELS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "norm_topk_prob": True,
        "head_dim": 8,
    },
    "qwen2_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
    },
    "olmoe": {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    "granitemoe": {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {**_MLA, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    "deepseek_v2": {**_MLA, "topk_method": "group_limited_greedy", "routed_scaling_factor": 2.0},
}


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny causal LM of ``model_type`` with random weights (and random selection biases), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_COMMON, **MODELS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "e_score_correction_bias" in name:  # zero at init; make the selection bias matter
                buffer.normal_(0.0, 0.05)
    return model.eval()


# Values that give every block class a small instance (extra attributes are harmless).
_BLOCK_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 24,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "shared_experts_intermediate_size": 40,
    "shared_intermediate_size": 40,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 3,
    "moe_topk": 3,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
}

# Block class -> overrides that pick the configuration flexmoe converts (the defaults of
# these families select a variant it refuses; the refusal is tested separately).
BLOCK_OVERRIDES: dict[str, dict[str, Any]] = {
    "Cohere2MoeSparseMoeBlock": {"shared_expert_combination_strategy": "sum"},
    "HYV3MoE": {"enable_moe_fp32_combine": False},
    "Lfm2MoeSparseMoeBlock": {"norm_topk_prob": False, "use_expert_bias": True},
}


def save_tiny_models(tmp_path_factory: Any, families: Iterable[str]) -> dict[str, Path]:
    """family -> a ``save_pretrained`` directory of its tiny model, sharded into several files."""
    directories = {}
    for family in families:
        directory = tmp_path_factory.mktemp(family)
        tiny_model(family).save_pretrained(directory, max_shard_size="40KB")
        directories[family] = directory
    return directories


def _config_class(block_class: type[nn.Module]) -> type:
    from transformers import PreTrainedConfig

    module = sys.modules[block_class.__module__]
    candidates = [
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, PreTrainedConfig) and value is not PreTrainedConfig
    ]
    name = block_class.__name__

    def shared_prefix(config_class: type) -> tuple[int, int]:
        stem = config_class.__name__.removesuffix("Config")
        n = 0
        while n < min(len(stem), len(name)) and stem[n] == name[n]:
            n += 1
        return n, -len(stem)

    return max(candidates, key=shared_prefix)


def tiny_block(block_class: type[nn.Module], seed: int = 0, **overrides: Any) -> nn.Module:
    """A small instance of any supported block class, random weights and selection biases."""
    config = _config_class(block_class)()
    for key, value in {**_BLOCK_SIZES, **BLOCK_OVERRIDES.get(block_class.__name__, {}), **overrides}.items():
        setattr(config, key, value)
    config._experts_implementation = "eager"
    kwargs = {"layer_idx": 0} if "layer_idx" in inspect.signature(block_class.__init__).parameters else {}
    torch.manual_seed(seed)
    block = block_class(config, **kwargs)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.1)
        for buffer in block.buffers():
            if buffer.is_floating_point():
                buffer.normal_(0.0, 0.05)
    return block


def bare_instance(block_class: type[nn.Module]) -> nn.Module:
    """An instance without ``__init__`` (no configuration needed): enough to be found and refused by class."""
    block = block_class.__new__(block_class)
    nn.Module.__init__(block)
    return block
