"""``load_offloaded``: a ``transformers`` MoE model whose experts stay on disk, read into a budgeted cache.

Legend: D model dim, F expert hidden dim, H first-projection width (2F), E experts.

Steps of ``load_offloaded``:

1. Build the model from its ``config.json`` on the meta device (nothing allocated) and
   convert its MoE blocks (``flexmoe.hf.convert``).
2. Read the ``safetensors`` headers and name every stored tensor as the model names it,
   with ``transformers``' own checkpoint conversion rules (``save_pretrained`` writes
   per-expert tensors, e.g. ``experts.3.w1.weight``, that ``transformers`` stacks into
   ``experts.gate_up_proj [E, 2F, D]`` on load). Each expert of each block becomes a list
   of byte ranges: rows of stacked tensors, or per-expert tensors. An int8 expert tensor
   (``quantize_experts``) comes with its scales (``name + "_scale"``), read with it.
3. Point every block's ``MoELayer`` at one ``ExpertCache`` (``flexmoe.layer.offloaded``),
   which empties its expert Parameters, then allocate the rest (``to_empty``).
4. Set the buffers a checkpoint does not hold (rotary frequencies, with ``transformers``'
   initialiser, as ``from_pretrained`` does; flexmoe's pending expert counts, to zero) and
   load every other tensor from the files, rounded to the dtype ``from_pretrained`` would
   give it. A selection bias (DeepSeek's ``e_score_correction_bias``) is a stored tensor
   and loads like any other.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.experts import GroupedExperts
from flexmoe.experts.cache import POLICIES, CacheStats, ExpertCache, Policy
from flexmoe.experts.int8 import SCALE_SUFFIX, Int8Linear
from flexmoe.experts.kernels import decodes_plain
from flexmoe.experts.packed import PackedLinear, packed_inference_supported
from flexmoe.experts.rows import RowsLinear
from flexmoe.experts.store import ExpertPieces, SafetensorsExpertStore, SafetensorsFile, TensorSlice
from flexmoe.hf import _transformers
from flexmoe.hf.block import FlexMoEBlock
from flexmoe.hf.convert import convert
from flexmoe.layer import MoELayer
from flexmoe.layer.offloaded import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MIN_PRECISION,
    offload_experts,
    offloaded_cache,
    prefetch_experts,
)

__all__ = [
    "decode_linear_layers",
    "expert_tensor_names",
    "load_offloaded",
    "offload_stats",
    "pack_linear_layers",
    "parse_bytes",
    "quantize_linear_layers",
]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_bytes(value: int | str | None, name: str = "expert_budget") -> int | None:
    """Bytes from an int or a size such as ``"8GiB"``, ``"512MiB"``, ``"1.5GB"`` (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be a number of bytes, a size such as '8GiB', or None, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE.match(value)
        unit = match.group("unit").lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name} must be a size such as '8GiB', '512MiB' or '2GB', got {value!r}")
        number = int(float(match.group("number")) * _UNITS[unit])
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return number


def load_offloaded(
    path: str | Path,
    *,
    expert_budget: int | str | None = "8GiB",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    policy: Policy = "predictive",
    prefetch: bool = True,
    backend: str = "auto",
    io_threads: int = 4,
    packed: bool | None = None,
    direct_io: bool = True,
    prefetch_confidence: float = DEFAULT_CONFIDENCE,
    prefetch_min_precision: float = DEFAULT_MIN_PRECISION,
    int8_linear: bool = False,
) -> Any:
    """A ``transformers`` causal LM from a ``save_pretrained`` directory, its experts left on disk.

    The non-expert weights are loaded; each MoE block runs on a flexmoe ``MoELayer``
    (as after ``flexmoe.hf.convert``) whose experts are read from the ``safetensors``
    files when a token needs them, into one cache shared by all blocks that never holds
    more than ``expert_budget`` bytes. The model then works as usual, ``generate``
    included, in inference (no gradients reach the experts). ``offload_stats(model)``
    reports hits, misses, prefetch precision and recall, bytes read and held.

    Args:
        path: a directory written by ``save_pretrained`` (one or sharded ``safetensors``
            files), experts stored per expert or stacked ``[E, 2F, D]``; or its copy with
            int8 experts (``flexmoe.hf.quantize_experts``), read and computed as int8.
        expert_budget: the most bytes of expert weights held at once: an int or a size
            such as ``"8GiB"``; ``None``: unlimited. It must hold the top-k experts one
            token needs in one layer (else ``ValueError`` naming both numbers).
        dtype: the model's dtype (default: the config's ``dtype``, else fp32).
        device: where the model runs and the cached experts live.
        policy: the cache's eviction policy, ``"predictive"`` (default), ``"lru"`` or
            ``"lfu"`` (see ``flexmoe.experts.cache``).
        prefetch: read experts on background I/O threads: a layer's misses, and each
            MoE block's predicted experts while its decoder layer's attention runs (its
            router applied to the decoder layer's input, normalised as the block's input
            is; every MoE block but one in the first decoder layer is predicted). ``False``: predictions are
            still made and scored, and every read happens when a block needs it.
        backend: flexmoe's expert GEMM backend.
        io_threads: how many expert reads run at once in the background.
        packed: keep the float weights as oneDNN-packed copies: the experts in the cache
            (``flexmoe.experts.packed.PackedWeight``; int8 experts stay int8) and every
            untied ``nn.Linear`` (``pack_linear_layers``). Decoding computes them about
            1.6x faster on the CPU than the BLAS product, in about the same bytes.
            ``None`` (default): where the row kernels decode the plain weights (bf16 on
            a CPU with AVX512-BF16, ``flexmoe.experts.rows``: faster still, and an
            expert read from disk is used as read), nothing is packed and the linear
            layers decode on the row kernels (``decode_linear_layers``); elsewhere both
            are packed where the device and dtype support it (a CPU with oneDNN fp32 or
            native bf16 matmuls). ``False``: plain weights, on the row kernels where
            they apply.
        direct_io: read experts past the OS page cache (``O_DIRECT``) where the file system
            allows: the disk writes into the cache's buffers and the read costs the CPU
            almost nothing. ``False``: through the page cache, which then keeps what was
            read in free memory, for later runs too.
        prefetch_confidence: a predicted expert is read ahead only if the router gives it
            at least this many times the uniform probability ``1 / E`` (0: every one of
            the predicted top-k).
        prefetch_min_precision: a predicted expert is read ahead only if at least this
            fraction of its block's past predictions of it were used (counted with one
            right and one wrong guess to start; 0: always).
        int8_linear: hold every untied ``nn.Linear`` (the attention's projections, dense
            and shared-expert MLPs, an untied head) as int8 with per-output-channel
            scales (``quantize_linear_layers``), as the experts of a ``quantize_experts``
            copy are: a decoded token then reads half their bf16 bytes. A head tied to
            the embedding stays as it is.

    Returns:
        The model (eval mode). Do not save or ``revert`` it: its experts are not in it.
    """
    transformers = _transformers.require()
    budget = parse_bytes(expert_budget)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(direct_io, bool):
        raise ValueError(f"direct_io must be True or False, got {direct_io!r}")
    if not isinstance(int8_linear, bool):
        raise ValueError(f"int8_linear must be True or False, got {int8_linear!r}")
    if isinstance(prefetch_confidence, bool) or not (
        isinstance(prefetch_confidence, int | float) and prefetch_confidence >= 0
    ):
        raise ValueError(f"prefetch_confidence must be a number >= 0, got {prefetch_confidence!r}")
    if isinstance(prefetch_min_precision, bool) or not (
        isinstance(prefetch_min_precision, int | float) and 0 <= prefetch_min_precision <= 1
    ):
        raise ValueError(f"prefetch_min_precision must be a number in [0, 1], got {prefetch_min_precision!r}")
    directory = Path(path)
    files = _safetensors_files(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    # 1. the model on the meta device, converted
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    conversion = convert(model, backend=backend)
    blocks = list(conversion.blocks.items())
    expected = {key: (tuple(t.shape), t.dtype) for key, t in model.state_dict(keep_vars=True).items()}
    # 2. every stored tensor under the model's name; the experts' byte ranges
    stored = _StoredTensors.find(model, files, {path for path, _ in blocks})
    pieces = {}
    for index, (block_path, block) in enumerate(blocks):
        for expert, expert_pieces in enumerate(stored.expert_pieces(block_path, block)):
            pieces[(index, expert)] = expert_pieces
    if len({p.quantized for p in pieces.values()}) > 1:
        raise ValueError(f"{directory}: some experts are int8 and some are not (quantize all or none)")
    expert_dtype = _experts(blocks[0][1]).w_in.dtype
    quantized = any(p.quantized for p in pieces.values())
    supported = packed_inference_supported(torch.device(device), expert_dtype)
    if packed and not supported:
        raise ValueError(f"packed: needs a CPU with oneDNN {expert_dtype} matmuls, got {device}")
    rows = decodes_plain(expert_dtype) and torch.device(device).type == "cpu"
    pack = (supported and not rows) if packed is None else packed
    store = SafetensorsExpertStore(
        pieces, dtype=expert_dtype, device=device, pack=pack and not quantized, direct=direct_io
    )
    _check_budget(budget, expert_budget, blocks, store)
    # 3. the cache, and every block's experts read through it
    cache = ExpertCache(store, len(blocks), budget, policy, prefetch, io_threads)
    strategies = [
        offload_experts(block.moe, cache, index, store.nbytes((index, 0)))
        for index, (_, block) in enumerate(blocks)
    ]
    for (block_path, _), strategy in zip(blocks, strategies, strict=True):
        strategy.name = block_path
        strategy.confidence = float(prefetch_confidence)
        strategy.min_precision = float(prefetch_min_precision)
    for block_path, block in blocks:
        _predict_from_residual(model, block_path, block.moe)
    model.to_empty(device=device)
    # 4. the buffers no file holds, then every stored non-expert tensor
    _initialise_unsaved_buffers(model)
    _load_stored(model, stored, expected)
    if int8_linear:
        quantize_linear_layers(model)
    if pack:
        pack_linear_layers(model)
    elif rows:
        decode_linear_layers(model)
    generation = directory / "generation_config.json"
    if generation.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return model


def _untied_linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, name, layer)`` of every ``nn.Linear`` whose weight no other module shares."""
    owners = Counter(
        p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False)
    )
    return [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if type(child) is nn.Linear and owners[child.weight.untyped_storage().data_ptr()] == 1
    ]


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose weight no other module shares by a ``PackedLinear``.

    For inference on the CPU: a decoded token's products with the attention's and the
    head's weights then run on oneDNN's packed weights (about 1.6x faster than the BLAS
    matrix-vector product in bf16), in the same memory. A weight tied to another (an
    output head sharing the embedding) is left as it is. Returns how many were packed.
    """
    count = 0
    for module, name, child in _untied_linear_layers(model):
        if packed_inference_supported(child.weight.device, child.weight.dtype):
            setattr(module, name, PackedLinear.of(child))
            count += 1
    return count


def quantize_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` whose weight no other module shares by an ``Int8Linear``.

    For inference: the attention's projections, dense and shared-expert MLPs and an
    untied head then hold int8 weights with per-output-channel scales, as the experts
    of a ``quantize_experts`` copy do, and a decoded token reads half their bf16 bytes
    (on a CPU with AVX512-VNNI at memory speed, ``flexmoe.experts.rows``). A weight tied
    to another (an output head sharing the embedding) is left as it is. Returns how many
    were quantized.
    """
    layers = _untied_linear_layers(model)
    for module, name, child in layers:
        setattr(module, name, Int8Linear.of(child))
    return len(layers)


def decode_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` that the row kernels decode by a ``RowsLinear``.

    For inference on a CPU with AVX512-BF16: a decoded token's products with the
    attention's and the head's bf16 weights then stream the plain weights once
    (``flexmoe.experts.rows``), faster than oneDNN's packed product (measured in
    ``benchmarks/offload.py``); prefill keeps ``F.linear``. The layers keep their
    Parameters (tied weights stay tied). Returns how many were replaced.
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            if child.weight.device.type == "cpu" and decodes_plain(child.weight.dtype):
                setattr(module, name, RowsLinear.of(child))
                count += 1
    return count


class _ResidualPredictor:
    """A decoder layer's forward pre-hook: its input, normalised, predicts its MoE block's experts."""

    def __init__(self, moe: MoELayer, norm: nn.Module) -> None:
        self.moe = moe
        self.norm = norm

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor):
            with torch.no_grad():
                prefetch_experts(self.moe, self.norm(hidden))


def _predict_from_residual(model: nn.Module, block_path: str, moe: MoELayer) -> None:
    """Predict ``moe``'s experts when its decoder layer starts (Mixtral-offloading's prediction).

    The decoder layer's input is the residual stream the previous layer left; its
    ``post_attention_layernorm`` is what normalises the block's own input after the
    attention, so the router sees nearly what it will see. Not in the first decoder
    layer (``model.layers.0``), whose input is the token's embedding: the attention
    changes it too much for a useful guess. A family whose decoder layer has no such
    norm gets no prediction.
    """
    decoder_path = block_path.rpartition(".")[0]
    decoder = model.get_submodule(decoder_path)
    norm = getattr(decoder, "post_attention_layernorm", None)
    if isinstance(norm, nn.Module) and not decoder_path.endswith(".0"):
        decoder.register_forward_pre_hook(_ResidualPredictor(moe, norm), with_kwargs=True)


def offload_stats(model: nn.Module) -> CacheStats:
    """The expert cache's statistics of a model from ``load_offloaded`` (see ``CacheStats``)."""
    cache = offloaded_cache(model)
    if cache is None:
        raise ValueError(f"{type(model).__name__} has no offloaded experts (load it with load_offloaded)")
    return cache.stats


def expert_tensor_names(path: str | Path) -> dict[Path, set[str]]:
    """The stored tensors of a ``save_pretrained`` directory that hold routed experts, by file.

    Found as ``load_offloaded`` finds them: the model built from ``config.json`` on the
    meta device, converted, and every stored name matched to the model's with
    ``transformers``' checkpoint conversion rules (shared experts are not routed experts).
    """
    transformers = _transformers.require()
    directory = Path(path)
    files = _safetensors_files(directory)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(directory)
        )
    stored = _StoredTensors.find(model, files, set(convert(model).blocks))
    names: dict[Path, set[str]] = {file.path: set() for file in files}
    for parts in stored.experts.values():
        for by_expert in parts.values():
            for piece in by_expert.values():
                names[piece.file.path].add(piece.name)
    return names


def _safetensors_files(directory: Path) -> list[SafetensorsFile]:
    """The model's ``safetensors`` files: those of the shard index, else ``model.safetensors``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (expected a save_pretrained directory)")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{directory} has neither model.safetensors nor model.safetensors.index.json "
            "(load_offloaded reads safetensors checkpoints)"
        )
    return [SafetensorsFile(directory / name) for name in names]


@dataclass
class _StoredTensors:
    """The files' tensors under the model's names: plain tensors, and expert pieces by block."""

    plain: dict[str, TensorSlice] = field(default_factory=dict)
    # model key (``<block>.experts.gate_up_proj``) -> part ("fused", or the converter's
    # source index: 0 gate, 1 up) -> expert (None: stacked) -> slice
    experts: dict[str, dict[object, dict[int | None, TensorSlice]]] = field(default_factory=dict)

    @classmethod
    def find(cls, model: nn.Module, files: list[SafetensorsFile], block_paths: set[str]) -> _StoredTensors:
        """Name every tensor of ``files`` as ``model`` does (``transformers``' renaming rules)."""
        loading = _transformers.load("transformers.core_model_loading")
        mapping = _transformers.load("transformers.conversion_mapping").get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, loading.WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, loading.WeightConverter)]
        names = dict.fromkeys(model.state_dict(keep_vars=True))
        found = cls()
        for file in files:
            scales = _int8_scales(file)
            for key in file.tensors:
                if key in scales.values():
                    continue  # read with the int8 tensor it scales
                scale = TensorSlice(file, scales[key]) if key in scales else None
                name, pattern = loading.rename_source_key(
                    key, renamings, converters, model.base_model_prefix, names
                )
                block, _, what = name.rpartition(".experts.")
                if block in block_paths and what in ("gate_up_proj", "down_proj"):
                    parts = found.experts.setdefault(f"{block}.experts.{what}", {})
                    if pattern is None:
                        parts.setdefault("fused", {})[None] = TensorSlice(file, key, scale=scale)
                    else:
                        converter = next(c for c in converters if pattern in c.source_patterns)
                        _check_converter(converter, what, key)
                        expert = _expert_index(key, pattern)
                        part = converter.source_patterns.index(pattern)
                        parts.setdefault(part, {})[expert] = TensorSlice(file, key, scale=scale)
                elif scale is not None:
                    raise ValueError(f"{key} in {file.path} is int8 but not an expert weight")
                else:
                    found.plain[name] = TensorSlice(file, key)
        return found

    def expert_pieces(self, block_path: str, block: FlexMoEBlock) -> list[ExpertPieces]:
        """Each expert's pieces for the converted ``block`` at ``block_path`` (shapes checked)."""
        E, H, D = _experts(block).w_in.shape
        F = H // 2
        w_in = self._pieces(f"{block_path}.experts.gate_up_proj", E, [(H, D)], [(F, D), (F, D)])
        w_out = self._pieces(f"{block_path}.experts.down_proj", E, [(D, F)], [(D, F)])
        return [ExpertPieces(tuple(w_in[e]), w_out[e][0]) for e in range(E)]

    def _pieces(
        self, key: str, E: int, fused_shape: list[tuple[int, int]], split_shapes: list[tuple[int, int]]
    ) -> list[list[TensorSlice]]:
        """``[expert][piece]`` slices of the model's ``key [E, ...]``; ``ValueError`` if not stored right."""
        parts = self.experts.get(key)
        if not parts:
            raise ValueError(
                f"the checkpoint has no tensor for {key} (looked for stacked and per-expert tensors)"
            )
        if "fused" in parts:
            whole = parts["fused"][None]
            if whole.shape != (E, *fused_shape[0]):
                expected = (E, *fused_shape[0])
                raise ValueError(
                    f"{whole.name} in {whole.file.path} has shape {whole.shape}, expected {expected}"
                )
            _check_scale(whole)
            return [[_row(whole, e)] for e in range(E)]
        out: list[list[TensorSlice]] = [[] for _ in range(E)]
        for part, shape in enumerate(split_shapes):
            by_expert = parts.get(part, {})
            for e in range(E):
                piece = by_expert.get(e)
                if piece is None:
                    raise ValueError(f"the checkpoint lacks expert {e} (part {part}) of {key}")
                if piece.shape != shape:
                    raise ValueError(
                        f"{piece.name} in {piece.file.path} has shape {piece.shape}, expected {shape}"
                    )
                _check_scale(piece)
                out[e].append(piece)
        return out


def _int8_scales(file: SafetensorsFile) -> dict[str, str]:
    """``int8 tensor -> its scales`` in ``file`` (``name`` and ``name + SCALE_SUFFIX``)."""
    return {
        name: name + SCALE_SUFFIX
        for name, info in file.tensors.items()
        if info.dtype == torch.int8 and name + SCALE_SUFFIX in file.tensors
    }


def _row(whole: TensorSlice, e: int) -> TensorSlice:
    """Expert ``e``'s row of a stacked tensor (and of its scales)."""
    scale = None if whole.scale is None else TensorSlice(whole.scale.file, whole.scale.name, e)
    return TensorSlice(whole.file, whole.name, e, scale)


def _check_scale(piece: TensorSlice) -> None:
    """Raise ``ValueError`` unless an int8 tensor ``[..., O, I]`` has scales ``[..., O]`` (float: none)."""
    info = piece.file.tensors[piece.name]
    if piece.scale is None:
        if info.dtype == torch.int8:
            raise ValueError(f"{piece.name} in {piece.file.path} is int8 without {piece.name + SCALE_SUFFIX}")
        return
    scale = piece.file.tensors[piece.scale.name].shape
    if scale != info.shape[:-1]:
        raise ValueError(
            f"{piece.scale.name} in {piece.file.path} has shape {scale}, expected {info.shape[:-1]} "
            f"(one scale per output channel of {piece.name})"
        )


def _experts(block: FlexMoEBlock) -> GroupedExperts:
    experts = block.moe.experts
    if not isinstance(experts, GroupedExperts):  # convert builds GroupedExperts
        raise TypeError(f"expected GroupedExperts in a converted block, got {type(experts).__name__}")
    return experts


def _check_converter(converter: Any, what: str, key: str) -> None:
    """Refuse a ``transformers`` expert conversion other than stacking per-expert tensors (and gate; up)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    wanted = (
        [("MergeModulelist", 0), ("Concatenate", 1)] if what == "gate_up_proj" else [("MergeModulelist", 0)]
    )
    if ops != wanted or len(converter.source_patterns) != len(wanted):
        raise ValueError(
            f"load_offloaded does not read {key}: transformers converts it with {ops}, not by stacking "
            "per-expert tensors"
        )


def _expert_index(key: str, pattern: str) -> int:
    """The expert number matched in ``key`` by the ``*`` of ``pattern`` (``"experts.*.up_proj.weight"``)."""
    match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key) or re.search(r"experts\.(\d+)\.", key)
    if match is None:
        raise ValueError(f"cannot tell which expert {key} holds")
    return int(match.group(1))


def _check_budget(
    budget: int | None, given: object, blocks: list[tuple[str, FlexMoEBlock]], store: SafetensorsExpertStore
) -> None:
    """Raise ``ValueError`` if the budget cannot hold the top-k experts of one token in some layer."""
    if budget is None:
        return
    for index, (path, block) in enumerate(blocks):
        top_k, each = block.moe.config.top_k, store.nbytes((index, 0))
        if top_k * each > budget:
            raise ValueError(
                f"expert_budget={given!r} ({budget} bytes) is too small: one step of {path} needs its "
                f"top-{top_k} experts in memory at once, {top_k} x {each} = {top_k * each} bytes"
            )


def _initialise_unsaved_buffers(model: nn.Module) -> None:
    """Set the non-persistent buffers, which ``to_empty`` left uninitialised and no file holds."""
    init_weights = getattr(model, "_init_weights", None)  # transformers' per-module initialiser
    with torch.no_grad():
        for module in model.modules():
            unsaved = [
                buffer
                for name, buffer in module.named_buffers(recurse=False)
                if name in getattr(module, "_non_persistent_buffers_set", ())
            ]
            if not unsaved:
                continue
            if isinstance(module, MoELayer):  # its pending expert counts start at zero
                for buffer in unsaved:
                    buffer.zero_()
            elif init_weights is not None:
                init_weights(module)


def _load_stored(
    model: nn.Module, stored: _StoredTensors, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    """Load every stored non-expert tensor, file by file; raise if the model misses one."""
    held = model.state_dict(keep_vars=True)
    expert_keys = {key for key in expected if key in stored.experts}
    wanted = [key for key in expected if key not in expert_keys]
    unknown = sorted(set(stored.plain) - set(expected))
    if unknown:
        raise ValueError(f"the checkpoint has tensors the model does not: {unknown[:5]}")
    loaded: set[str] = set()
    by_file: dict[Path, dict[str, Tensor]] = {}
    for key in wanted:
        piece = stored.plain.get(key)
        if piece is None:
            continue
        shape, dtype = expected[key]
        value = piece.read()
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{piece.name} in {piece.file.path} has shape {tuple(value.shape)}, the model {shape}"
            )
        by_file.setdefault(piece.file.path, {})[key] = value.to(dtype)  # as from_pretrained rounds it
        loaded.add(key)
    for values in by_file.values():
        model.load_state_dict(values, strict=False)
    loaded_tensors = {id(held[key]) for key in loaded}
    missing = [
        key for key in wanted if key not in loaded and id(held[key]) not in loaded_tensors
    ]  # tied ones
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
