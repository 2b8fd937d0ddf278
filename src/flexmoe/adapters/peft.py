"""PEFT's adapter files for models converted with ``flexmoe.hf.convert``, both ways.

PEFT (``peft>=0.17``) adapts fused expert tensors with ``LoraConfig(target_parameters=
[...])``: a ``ParamWrapper`` around the experts module per targeted Parameter. For a
``transformers`` experts module with ``gate_up_proj [E, H, D]`` and ``down_proj [E, D, F]``
(``[experts, out, in]``) and rank ``r`` it stores, per targeted Parameter,

- ``lora_A.weight [E*r, in]``: expert ``e``'s ``A`` in rows ``e*r .. e*r+r-1``;
- ``lora_B.weight [out, r*E]``: rank-major columns, expert ``e``'s ``B[:, j]`` in column
  ``j*E + e``;

and updates the Parameter by ``alpha / r * B_e @ A_e`` per expert (PEFT 0.21.2,
``ParamWrapper.get_delta_weight``). With both Parameters targeted the wrappers nest in
the experts module's Parameter order (PEFT sorts the targets and walks
``named_parameters``): the first one sits innermost, its keys carry one more
``base_layer.``. The saved keys are ``base_model.model.<module path>.<experts>.[base_layer.]lora_A.weight``
(the adapter name is dropped). flexmoe's factors are the same matrices per expert:
``A`` is a reshape, ``B`` a permutation of the columns.

PEFT's ``ParamWrapper`` refuses dropout: an adapter saved from flexmoe records
``lora_dropout: 0.0`` (dropout is a training-time setting; the weights are the same).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.adapters.lora import add_lora, lora_adapters
from flexmoe.checkpoint.files import safetensors_torch
from flexmoe.experts import GroupedExperts
from flexmoe.experts.lora import ExpertLoRA
from flexmoe.hf import FlexMoEBlock

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_peft_adapter", "save_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TARGET_OF = {"w_in": "gate_up_proj", "w_out": "down_proj"}  # flexmoe target -> transformers name


def _blocks(model: nn.Module) -> dict[str, FlexMoEBlock]:
    blocks = {path: m for path, m in model.named_modules() if isinstance(m, FlexMoEBlock)}
    if not blocks:
        raise ValueError("model has no converted MoE block: convert it with flexmoe.hf.convert first")
    return blocks


def _experts_modules(block: FlexMoEBlock, path: str) -> tuple[nn.Module, GroupedExperts]:
    """The original ``transformers`` experts module (checked to share flexmoe's weights) and flexmoe's."""
    experts = getattr(block.original, "experts", None)
    moe_experts = block.moe.experts
    if (
        not isinstance(experts, nn.Module)
        or not isinstance(moe_experts, GroupedExperts)
        or getattr(experts, "gate_up_proj", None) is not moe_experts.w_in
        or getattr(experts, "down_proj", None) is not moe_experts.w_out
        or getattr(experts, "is_transposed", False)
    ):
        raise NotImplementedError(
            f"{path}: PEFT's adapter format is mapped for blocks whose experts.gate_up_proj and "
            f"experts.down_proj are flexmoe's w_in and w_out ({block.original_class} is not)"
        )
    return experts, moe_experts


def _key_prefixes(experts: nn.Module, path: str, targets: list[str]) -> dict[str, str]:
    """``flexmoe target -> key prefix`` as PEFT nests its wrappers (see the module docstring)."""
    order = [name for name, _ in experts.named_parameters(recurse=False)]
    names = sorted((_TARGET_OF[t] for t in targets), key=order.index)  # innermost first
    inverse = {v: k for k, v in _TARGET_OF.items()}
    depth = len(names)
    return {
        inverse[name]: f"{_PREFIX}{path}.experts." + "base_layer." * (depth - 1 - i)
        for i, name in enumerate(names)
    }


def _to_peft(adapter: ExpertLoRA, target: str) -> tuple[Tensor, Tensor]:
    """PEFT's ``(lora_A.weight [E*r, in], lora_B.weight [out, r*E])``; zero for experts without an adapter."""
    pair = adapter.factors(target)
    assert pair is not None
    A, B = (t.detach() for t in pair)
    E, r = adapter.num_experts, adapter.rank
    ids = adapter.expert_ids.to(A.device)
    A_E = A.new_zeros(E, r, A.shape[2]).index_copy_(0, ids, A)
    B_E = B.new_zeros(E, B.shape[1], r).index_copy_(0, ids, B)
    return A_E.reshape(E * r, -1).contiguous(), B_E.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous()


def _from_peft(A_peft: Tensor, B_peft: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """The flexmoe factors ``(A [E, r, in], B [E, out, r])`` from PEFT's two matrices."""
    r = A_peft.shape[0] // E
    return A_peft.reshape(E, r, -1), B_peft.reshape(B_peft.shape[0], r, E).permute(2, 0, 1)


def save_peft_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA adapters of a converted model as PEFT's ``save_pretrained`` would.

    ``directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors``;
    ``PeftModel.from_pretrained(unconverted_model, directory)`` then computes what the
    converted model with its adapters computes. Every adapter must have the same rank,
    alpha and rslora setting (PEFT's config holds one of each). Merged adapters are
    refused (their update is in the base weights). Returns the directory.
    """
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA adapters to save (add_lora or load_peft_adapter first)")
    spread = sorted(path for path, a in adapters.items() if a.adapted_experts is not None)
    if spread:
        raise NotImplementedError(
            f"PEFT files of adapters on distributed layers ({spread}) are not supported: "
            "load lora_state_dict(model) into a single-device copy and save that"
        )
    settings = {(a.rank, a.alpha, a.use_rslora) for a in adapters.values()}
    if len(settings) > 1:
        raise ValueError(
            f"PEFT's config holds one rank, alpha and rslora for all adapters, got {sorted(settings)}"
        )
    if any(a.merged for a in adapters.values()):
        raise ValueError("merged LoRA adapters cannot be saved as adapters: unmerge_lora(model) first")
    tensors: dict[str, Tensor] = {}
    target_parameters = []
    saved = set()
    for path, block in _blocks(model).items():
        original, experts = _experts_modules(block, path)
        adapter = experts.lora
        if adapter is None:
            continue
        for target, prefix in _key_prefixes(original, path, list(adapter.targets)).items():
            tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"] = _to_peft(adapter, target)
            target_parameters.append(f"{path}.experts.{_TARGET_OF[target]}")
        saved.add(f"{path}.moe.experts")
    elsewhere = sorted(set(adapters) - saved)
    if elsewhere:
        raise ValueError(
            f"PEFT's format covers converted transformers blocks only, not the adapters of {elsewhere}"
        )
    rank, alpha, use_rslora = settings.pop()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": use_rslora,
        "target_modules": [],
        "target_parameters": target_parameters,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors_torch().save_file({k: v.cpu() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS))
    return out


def load_peft_adapter(
    model: nn.Module, directory: str | Path, freeze_base: bool = True
) -> dict[str, ExpertLoRA]:
    """Attach the LoRA adapter PEFT saved in ``directory`` to a converted model; returns the adapters.

    The adapter must target only the experts' ``gate_up_proj`` / ``down_proj``
    (``target_parameters``) of converted blocks, with one rank and alpha, no DoRA and no
    LoRA bias (``ValueError`` otherwise). Experts whose factors are all zero in the file
    (a flexmoe adapter of some experts) get no adapter. ``freeze_base`` as in ``add_lora``.
    """
    blocks = _blocks(model)
    spread = sorted(path for path, block in blocks.items() if block.moe.world_size > 1)
    if spread:
        raise NotImplementedError(
            f"PEFT files into distributed blocks ({spread}) are not supported: load them into a "
            "single-device copy, then load_lora_state_dict(model, lora_state_dict(copy))"
        )
    folder = Path(directory)
    config: dict[str, Any] = json.loads((folder / ADAPTER_CONFIG).read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (LORA needed)")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} {config[key]!r} (one rank and alpha needed)")
    for key, fine in (("use_dora", False), ("lora_bias", False), ("bias", "none")):
        if config.get(key, fine) != fine:
            problems.append(f"{key}={config[key]!r}")
    if problems:
        raise ValueError(f"{folder}: unsupported PEFT adapter: {', '.join(problems)}")
    tensors: dict[str, Tensor] = safetensors_torch().load_file(str(folder / ADAPTER_WEIGHTS))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    targets_given = list(config.get("target_parameters") or [])
    used: set[str] = set()
    loaded: dict[str, ExpertLoRA] = {}
    plans = []
    for path, block in blocks.items():
        original, experts = _experts_modules(block, path)
        targets = [
            t
            for t, name in _TARGET_OF.items()
            if any(
                key == f"{path}.experts.{name}" or f"{path}.experts.{name}".endswith(f".{key}")
                for key in targets_given
            )
        ]
        if not targets:
            continue
        factors = {}
        for target, prefix in _key_prefixes(original, path, targets).items():
            keys = (prefix + "lora_A.weight", prefix + "lora_B.weight")
            if not all(k in tensors for k in keys):
                raise ValueError(f"{folder}: {keys[0]} or {keys[1]} is missing")
            used.update(keys)
            factors[target] = _from_peft(tensors[keys[0]], tensors[keys[1]], experts.num_experts)
        plans.append((path, experts, factors))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{folder}: entries for parts flexmoe does not adapt: {unused[:4]}")
    if not plans:
        raise ValueError(f"{folder}: the adapter targets no converted block's experts ({targets_given})")
    for path, experts, factors in plans:
        nonzero = torch.zeros(experts.num_experts, dtype=torch.bool)
        for A, B in factors.values():
            nonzero |= (A.reshape(A.shape[0], -1) != 0).any(1).cpu() | (B.reshape(B.shape[0], -1) != 0).any(
                1
            ).cpu()
        ids = nonzero.nonzero().flatten().tolist() or None
        experts_path = f"{path}.moe.experts"
        adapter = add_lora(
            experts,
            rank,
            alpha,
            experts=ids,
            targets=list(factors),
            use_rslora=bool(config.get("use_rslora", False)),
            freeze_base=False,
        )[""]
        with torch.no_grad():
            index = adapter.expert_ids.to(next(iter(factors.values()))[0].device)
            for target, (A, B) in factors.items():
                own = adapter.factors(target)
                assert own is not None
                own[0].copy_(A.index_select(0, index))
                own[1].copy_(B.index_select(0, index))
        loaded[experts_path] = adapter
    if freeze_base:
        adapter_params = {id(p) for a in loaded.values() for p in a.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter_params)
    return loaded
