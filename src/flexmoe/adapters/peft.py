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

Blocks whose experts are spread over ranks (``flexmoe.hf.convert(model, group=...)``)
go through the single-device layout of ``lora_state_dict`` / ``load_lora_state_dict``:
saving gathers every rank's factors (a collective) and rank 0 writes what a
single-device model writes; loading gives each rank its own experts' rows (or shards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.adapters.lora import (
    add_lora,
    distributed_layers,
    load_lora_state_dict,
    lora_adapters,
    lora_state_dict,
)
from flexmoe.checkpoint.files import safetensors_torch
from flexmoe.experts import GroupedExperts
from flexmoe.experts.lora import ExpertLoRA
from flexmoe.hf import FlexMoEBlock
from flexmoe.parallel import on_every_rank

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_peft_adapter", "save_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TARGET_OF = {"w_in": "gate_up_proj", "w_out": "down_proj"}  # flexmoe target -> transformers name
_FACTORS_OF = {"w_in": ("A_in", "B_in"), "w_out": ("A_out", "B_out")}  # flexmoe target -> factor names


def _blocks(model: nn.Module) -> dict[str, FlexMoEBlock]:
    blocks = {path: m for path, m in model.named_modules() if isinstance(m, FlexMoEBlock)}
    if not blocks:
        raise ValueError("model has no converted MoE block: convert it with flexmoe.hf.convert first")
    return blocks


def _peft_experts(block: FlexMoEBlock, path: str) -> nn.Module:
    """The original ``transformers`` experts module, checked to map onto flexmoe's ``w_in`` / ``w_out``.

    On one device its ``gate_up_proj`` / ``down_proj`` are flexmoe's Parameters; on a
    distributed block they were released after each rank copied its experts' rows
    (``FlexMoEBlock.build``), so only their presence and layout are checked.
    """
    experts = getattr(block.original, "experts", None)
    moe_experts = block.moe.experts
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if isinstance(moe_experts, GroupedExperts) and block.moe.world_size > 1:
        mapped = isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
    else:
        mapped = (
            isinstance(moe_experts, GroupedExperts)
            and gate_up is moe_experts.w_in
            and down is moe_experts.w_out
        )
    if not isinstance(experts, nn.Module) or not mapped or getattr(experts, "is_transposed", False):
        raise NotImplementedError(
            f"{path}: PEFT's adapter format is mapped for blocks whose experts.gate_up_proj and "
            f"experts.down_proj are flexmoe's w_in and w_out ({block.original_class} is not)"
        )
    return experts


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


def _to_peft(A: Tensor, B: Tensor, expert_ids: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``(lora_A.weight [E*r, in], lora_B.weight [out, r*E])`` from the adapted experts' factors.

    ``A [k, r, in]`` and ``B [k, out, r]`` are the single-device factors of experts
    ``expert_ids``; the other experts get zero rows and columns.
    """
    r = A.shape[1]
    ids = expert_ids.to(A.device)
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

    With blocks distributed over ranks it is a collective: call it on every rank of the
    default process group. The factors are gathered into the single-device layout and
    rank 0 writes the same files a single-device model with the same adapter writes; the
    other ranks write nothing, wait for it, and raise too if rank 0's write failed.
    """
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA adapters to save (add_lora or load_peft_adapter first)")
    settings = {(a.rank, a.alpha, a.use_rslora) for a in adapters.values()}
    if len(settings) > 1:
        raise ValueError(
            f"PEFT's config holds one rank, alpha and rslora for all adapters, got {sorted(settings)}"
        )
    if any(a.merged for a in adapters.values()):
        raise ValueError("merged LoRA adapters cannot be saved as adapters: unmerge_lora(model) first")
    # 1. Check everything before the gather, so that every rank refuses alike (none waits alone).
    adapted = []
    for path, block in _blocks(model).items():
        original = _peft_experts(block, path)
        experts_path = f"{path}.moe.experts"
        if experts_path in adapters:
            adapted.append((path, original, experts_path, block.moe.config.num_experts))
    elsewhere = sorted(set(adapters) - {experts_path for _, _, experts_path, _ in adapted})
    if elsewhere:
        raise ValueError(
            f"PEFT's format covers converted transformers blocks only, not the adapters of {elsewhere}"
        )
    # 2. The factors in the single-device layout (gathered from every rank where distributed).
    state = lora_state_dict(model)
    tensors: dict[str, Tensor] = {}
    target_parameters = []
    for path, original, experts_path, E in adapted:
        targets = list(adapters[experts_path].targets)
        ids = state[f"{experts_path}.lora.expert_ids"]
        for target, prefix in _key_prefixes(original, path, targets).items():
            A, B = (state[f"{experts_path}.lora.{name}"] for name in _FACTORS_OF[target])
            tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"] = _to_peft(A, B, ids, E)
            target_parameters.append(f"{path}.experts.{_TARGET_OF[target]}")
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
    if not distributed_layers(model):
        _write(out, config, tensors)
        return out
    # 3. Rank 0 writes; every rank learns whether it could (and waits for the files).
    on_every_rank(
        lambda: _write(out, config, tensors),
        lambda: RuntimeError(f"save_peft_adapter: rank 0 failed to write {out}"),
        rank0_only=True,
    )
    return out


def _write(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors_torch().save_file({k: v.cpu() for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS))


def _read_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, checked for what flexmoe maps (``ValueError`` naming the rest)."""
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
    return config


def _peft_shapes(block: FlexMoEBlock, target: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The single-device shapes of PEFT's ``lora_A.weight`` and ``lora_B.weight`` for ``target``."""
    cfg = block.moe.config
    E, D, F = cfg.num_experts, cfg.dim, cfg.hidden_dim
    in_dim, out_dim = (D, 2 * F) if target == "w_in" else (F, D)
    return (E * rank, in_dim), (out_dim, rank * E)


def load_peft_adapter(
    model: nn.Module, directory: str | Path, freeze_base: bool = True
) -> dict[str, ExpertLoRA]:
    """Attach the LoRA adapter PEFT saved in ``directory`` to a converted model; returns the adapters.

    The adapter must target only the experts' ``gate_up_proj`` / ``down_proj``
    (``target_parameters``) of converted blocks, with one rank and alpha, no DoRA and no
    LoRA bias (``ValueError`` otherwise). Experts whose factors are all zero in the file
    (a flexmoe adapter of some experts) get no adapter. ``freeze_base`` as in ``add_lora``.

    Blocks distributed over ranks: every rank reads the files and keeps the factors of
    the experts it stores (its shard of them with sharded experts), as
    ``load_lora_state_dict`` places a single-device state; call it on every rank.
    """
    blocks = _blocks(model)
    folder = Path(directory)
    config = _read_config(folder)
    tensors: dict[str, Tensor] = safetensors_torch().load_file(str(folder / ADAPTER_WEIGHTS))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    targets_given = list(config.get("target_parameters") or [])
    used: set[str] = set()
    plans = []
    # 1. Map and check every entry before attaching anything (every rank refuses alike).
    for path, block in blocks.items():
        original = _peft_experts(block, path)
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
            for key, shape in zip(keys, _peft_shapes(block, target, rank), strict=True):
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(
                        f"{folder}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}"
                    )
            used.update(keys)
            factors[target] = _from_peft(tensors[keys[0]], tensors[keys[1]], block.moe.config.num_experts)
        plans.append((path, block, factors))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{folder}: entries for parts flexmoe does not adapt: {unused[:4]}")
    if not plans:
        raise ValueError(f"{folder}: the adapter targets no converted block's experts ({targets_given})")
    # 2. Attach each block's adapter and load its factors in the single-device layout.
    loaded: dict[str, ExpertLoRA] = {}
    for path, block, factors in plans:
        E = block.moe.config.num_experts
        nonzero = torch.zeros(E, dtype=torch.bool)
        for A, B in factors.values():
            nonzero |= (A.reshape(E, -1) != 0).any(1).cpu() | (B.reshape(E, -1) != 0).any(1).cpu()
        ids = nonzero.nonzero().flatten().tolist() or None
        adapter = add_lora(
            block.moe,
            rank,
            alpha,
            experts=ids,
            targets=list(factors),
            use_rslora=bool(config.get("use_rslora", False)),
            freeze_base=False,
        )["experts"]
        index = torch.tensor(list(range(E)) if ids is None else ids, dtype=torch.int64)
        state = {"experts.lora.expert_ids": index}
        for target, (A, B) in factors.items():
            A_name, B_name = _FACTORS_OF[target]
            state[f"experts.lora.{A_name}"] = A.index_select(0, index.to(A.device))
            state[f"experts.lora.{B_name}"] = B.index_select(0, index.to(B.device))
        load_lora_state_dict(block.moe, state)  # a distributed block keeps its experts' rows
        loaded[f"{path}.moe.experts"] = adapter
    if freeze_base:
        adapter_params = {id(p) for a in loaded.values() for p in a.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter_params)
    return loaded
