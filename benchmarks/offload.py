"""Experts on disk: flexmoe's budgeted expert cache against accelerate's disk offload and plain mmap.

Part 1, a model larger than memory. A random-weight Qwen3-MoE-shaped model (Qwen3-30B-A3B's
widths: D 2048, F 768, 128 experts, top-8) with ``--experts-gb`` of bf16 experts (30 GB:
more than this machine's RAM), generated once under ``--cache-dir`` (tensor by tensor,
never held in memory) in ``transformers``' own stacked layout (``experts.gate_up_proj
[E, 2F, D]``), so that accelerate's disk offload reads the files in place rather than
copying them; its int8 copy (``flexmoe.hf.quantize_experts``) beside it. Each contestant
runs in its own process, after the page cache of every file was dropped
(``posix_fadvise(POSIX_FADV_DONTNEED)``): a prefill of ``--prompt-tokens`` and a greedy
decode of ``--new-tokens``, batch 1:

- ``accelerate``: ``from_pretrained(device_map="auto", max_memory={"cpu": non-expert
  weights + budget}, offload_folder=...)``: what does not fit stays on disk, read per
  layer (every expert of it) at every step;
- ``mmap``: every tensor a view of the memory-mapped files (the OS page cache as the
  cache, free to use all free memory), ``transformers``' own experts code;
- ``flexmoe-bf16`` and ``flexmoe-int8``: ``flexmoe.hf.load_offloaded(expert_budget=...)``;
  ``flexmoe-int8-linear``: the int8 copy with ``int8_linear=True`` (the attention's
  weights int8 too).

It prints tokens/s for prefill and decode, peak resident memory, bytes read from storage
per token (``/proc/self/io``), the cache's hit rate, the int8 copy's logit error against
bf16, and the ratios (flexmoe against accelerate and mmap, int8 against bf16).

Part 2, real routing. The model ``flexmoe train`` produces (``--trained RUN_DIR``, else one
trained here and cached), on held-out text: its routing drives one ``ExpertCache`` with a
budget of a quarter of its experts, one token at a time as in decoding, with the next
layer's router predicting its experts (as ``load_offloaded`` does): hit rate and prefetch
precision / recall for the predictive policy, LRU and LFU. Also the int8 experts' cost on
that text (with and without int8 linear layers): logit error and perplexity against the
trained weights.

    python benchmarks/offload.py --tiny                 # a check, in about a minute
    python benchmarks/offload.py --prepare-only         # generate the 30 GB model (and its int8 copy)
    python benchmarks/offload.py --json offload.json    # the full run (Linux)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flexmoe.hf
from flexmoe.checkpoint import load_checkpoint
from flexmoe.experts.cache import POLICIES, ExpertCache, ExpertKey, ExpertWeights
from flexmoe.experts.int8 import Int8Weight, int8_linear, quantize_int8
from flexmoe.experts.kernels import decodes_plain
from flexmoe.experts.packed import PackedLinear, PackedWeight, packed_inference_supported
from flexmoe.experts.rows import RowsLinear, experts_bf16_at, takes_experts_bf16_at
from flexmoe.experts.served import served_linear
from flexmoe.experts.store import SafetensorsFile
from flexmoe.hf.quantize import TensorSpec, write_safetensors
from flexmoe.layer import MoELayer
from flexmoe.layer.offloaded import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MIN_PRECISION,
    offload_experts,
    prefetch_experts,
)
from flexmoe.models import TinyMoELM, TinyMoELMConfig
from flexmoe.models.data import stdlib_corpus
from harness import environment, write_json

CONTESTANTS = ("accelerate", "mmap", "flexmoe-bf16", "flexmoe-int8", "flexmoe-int8-linear")
PRODUCTS_ONLY = "products-only"  # the bound: MoE blocks that only compute their experts' products
QWEN3_30B_A3B = {  # the widths of Qwen3-30B-A3B; the depth follows --experts-gb
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
}
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 16,
    "num_experts_per_tok": 4,
}
COMPLETE = ".complete"  # written last: a directory without it is regenerated


# ---------------------------------------------------------------- the model on disk


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Qwen3MoeConfig`` fields of the benchmark model."""
    shape = dict(TINY if args.tiny else QWEN3_30B_A3B)
    per_layer = shape["num_experts"] * 3 * shape["hidden_size"] * shape["moe_intermediate_size"] * 2
    layers = args.layers or max(1, math.ceil(args.experts_gb * 1e9 / per_layer))
    return {
        **shape,
        "num_hidden_layers": layers,
        "norm_topk_prob": True,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def model_dirs(args: argparse.Namespace, config: dict[str, Any]) -> tuple[Path, Path]:
    """``(bf16 directory, int8 directory)`` under the cache folder, named by the configuration."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(args.cache_dir).expanduser() / f"qwen3moe-L{config['num_hidden_layers']}-{digest}"
    return root / "bf16", root / "int8"


def generate_model(directory: Path, fields: dict[str, Any], seed: int = 0) -> None:
    """Write a random-weight model as ``save_pretrained`` would, one shard per layer, tensor by tensor."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if (directory / COMPLETE).exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = Qwen3MoeConfig(**fields)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {
            k: (tuple(v.shape), v.dtype)
            for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
        }
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "other"
        groups.setdefault(group, []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, (group, names) in enumerate(sorted(groups.items()), start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        specs = [TensorSpec(name, torch.bfloat16, shapes[name][0]) for name in names]
        write_safetensors(directory / file, specs, _random_tensors(specs, generator))
        weight_map |= dict.fromkeys(names, file)
        total += sum(spec.nbytes for spec in specs)
        print(f"  wrote {file} ({group}, {sum(s.nbytes for s in specs) / 1e9:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / COMPLETE).touch()


def _random_tensors(specs: list[TensorSpec], generator: torch.Generator) -> Iterator[Tensor]:
    for spec in specs:
        if spec.name.endswith("norm.weight"):
            yield torch.ones(spec.shape, dtype=spec.dtype)
        else:
            yield torch.empty(spec.shape, dtype=spec.dtype).normal_(0.0, 0.02, generator=generator)


def prepare(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path]:
    """The model and its int8 copy, generated if missing."""
    config = model_config(args)
    bf16, int8 = model_dirs(args, config)
    expert_gb = config["num_hidden_layers"] * config["num_experts"] * 3 * config["hidden_size"]
    expert_gb *= config["moe_intermediate_size"] * 2 / 1e9
    print(
        f"model: {config['num_hidden_layers']} layers, {expert_gb:.1f} GB of bf16 experts, in {bf16.parent}"
    )
    generate_model(bf16, config)
    if not (int8 / COMPLETE).exists():
        shutil.rmtree(int8, ignore_errors=True)
        copy_ = flexmoe.hf.quantize_experts(bf16, int8)
        print(
            f"  int8 copy: experts {copy_.expert_bytes_before / 1e9:.2f} -> "
            f"{copy_.expert_bytes_after / 1e9:.2f} GB"
        )
        (int8 / COMPLETE).touch()
    return config, bf16, int8


def drop_page_cache(*directories: Path) -> None:
    """Evict every file under ``directories`` from the page cache (``POSIX_FADV_DONTNEED``: no root)."""
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages are not dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


# ---------------------------------------------------------------- contestants (one process each)


def load_contestant(name: str, args: argparse.Namespace, bf16: Path, int8: Path, offload: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    budget = flexmoe.hf.parse_bytes(args.budget)
    if name == "accelerate":
        limit = non_expert_bytes(bf16) + (budget or 0)
        return AutoModelForCausalLM.from_pretrained(
            bf16, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": limit}, offload_folder=offload
        ).eval()
    if name == "mmap":
        return load_mmap(bf16).eval()
    if name == PRODUCTS_ONLY:
        return products_only_model(bf16, budget)
    directory = bf16 if name == "flexmoe-bf16" else int8
    return flexmoe.hf.load_offloaded(
        directory, expert_budget=budget, dtype=torch.bfloat16, int8_linear=name == "flexmoe-int8-linear"
    )


def non_expert_bytes(directory: Path) -> int:
    files = [SafetensorsFile(p) for p in sorted(directory.glob("*.safetensors"))]
    return sum(i.end - i.begin for f in files for n, i in f.tensors.items() if ".experts." not in n)


def load_mmap(directory: Path) -> nn.Module:
    """The model with every tensor a view of the memory-mapped files (copy-on-write, never written)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        header = SafetensorsFile(path)
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, info in header.tensors.items():
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
            state[name] = raw.view(info.dtype).reshape(info.shape)
    model.load_state_dict(state, assign=True, strict=True)
    rotary = model.model.rotary_emb  # its non-persistent frequencies, as from_pretrained sets them
    model.model.rotary_emb = type(rotary)(config=config)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"mmap loader left tensors on the meta device: {meta[:3]}")
    return model


def read_bytes() -> int:
    """Bytes this process caused to be read from storage (``/proc/self/io``; 0 where absent)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_contestant(args: argparse.Namespace) -> None:
    """One contestant in this process: load, prefill, decode; prints one JSON line."""
    config, bf16, int8 = prepare_quiet(args)
    offload = Path(args.offload_folder)
    start, io = time.perf_counter(), read_bytes()
    model = load_contestant(args.run_contestant, args, bf16, int8, offload)
    load_s, load_read = time.perf_counter() - start, read_bytes() - io
    ids = torch.randint(
        0, config["vocab_size"], (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
    )
    tokens = []
    with torch.no_grad():
        start, io = time.perf_counter(), read_bytes()
        out = model(ids, use_cache=True)
        prefill_s, prefill_read = time.perf_counter() - start, read_bytes() - io
        last_logits = out.logits[0, -1].float()
        start, io = time.perf_counter(), read_bytes()
        new_tokens = decoded_tokens(args, args.run_contestant)
        for _ in range(new_tokens):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            out = model(token, use_cache=True, **kv_cache(model, out))
        decode_s, decode_read = time.perf_counter() - start, read_bytes() - io
    result: dict[str, Any] = {
        "name": args.run_contestant,
        "load_s": load_s,
        "load_read": load_read,
        "prefill_tok_s": args.prompt_tokens / prefill_s,
        "prefill_read_per_token": prefill_read / args.prompt_tokens,
        "new_tokens": new_tokens,
        "decode_tok_s": new_tokens / decode_s,
        "decode_read_per_token": decode_read / new_tokens,
        "peak_rss": peak_rss(),
        "tokens": tokens,
    }
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None:  # accelerate: how much of the model it left on disk
        result["disk_modules"] = sum(1 for where in device_map.values() if where == "disk")
        result["modules"] = len(device_map)
    if args.run_contestant.startswith("flexmoe"):
        stats = flexmoe.hf.offload_stats(model)
        result |= {"hit_rate": stats.hit_rate, "cache_bytes_read": stats.bytes_read}
        result |= {"precision": stats.prefetch_precision, "recall": stats.prefetch_recall}
    torch.save(last_logits, Path(args.offload_folder) / f"{args.run_contestant}.logits.pt")
    print("RESULT " + json.dumps(result), flush=True)


def kv_cache(model: nn.Module, out: Any) -> dict[str, Any]:
    """The keyword that passes the last step's KV cache back (``cache`` since transformers 5.25)."""
    if "cache" in inspect.signature(type(model).forward).parameters:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}


def decoded_tokens(args: argparse.Namespace, name: str) -> int:
    """Tokens ``name`` decodes: accelerate reads every offloaded layer whole at every step, so fewer."""
    return min(args.new_tokens, args.accelerate_new_tokens) if name == "accelerate" else args.new_tokens


def prepare_quiet(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path]:
    config = model_config(args)
    bf16, int8 = model_dirs(args, config)
    return config, bf16, int8


def large_model(args: argparse.Namespace) -> dict[str, Any]:
    """Every contestant ``--rounds`` times, round-robin, each in its own process from a cold page cache."""
    config, bf16, int8 = prepare(args)
    rounds: list[dict[str, dict[str, Any]]] = []
    round_rates: list[dict[str, float] | None] = []
    with tempfile.TemporaryDirectory(prefix="flexmoe-bench-") as scratch:
        for r in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            for name in args.contestants:
                result = run_in_process(name, args, bf16, int8, Path(scratch) / f"{name}-{r}")
                if result is not None:
                    results[name] = result
            # the least any MoE implementation inside the model takes, timed in this round too
            products = run_in_process(PRODUCTS_ONLY, args, bf16, int8, Path(scratch) / f"{PRODUCTS_ONLY}-{r}")
            if products is not None:
                results[PRODUCTS_ONLY] = products
            rounds.append(results)
            # the kernels' rates of this round, for its own floor: the host's bandwidth moves
            round_rates.append(matrix_vector_rates(config, rounds=3))
    print_large(rounds, config, args)
    rates = median_rates(round_rates)
    print_matrix_vector_bound(rates, config)
    floor = print_step_floor(rounds, round_rates, config)
    print_products_only(rounds)
    for results in rounds:
        for result in results.values():
            result.pop("logits", None)
    bound = None if rates is None else decode_bound(rates, config)
    return {
        "config": config,
        "budget": args.budget,
        "rounds": rounds,
        "matrix_vector_gb_s": rates,
        "matrix_vector_gb_s_per_round": round_rates,
        "int8_decode_bound": bound,
        "int8_roofline_bound": roofline_bound(config),
        "bf16_step_floor_s": floor,
    }


def run_in_process(
    name: str, args: argparse.Namespace, bf16: Path, int8: Path, offload: Path
) -> dict[str, Any] | None:
    """One run of contestant ``name`` in a fresh process after dropping the page cache (``None``: failed)."""
    offload.mkdir()
    drop_page_cache(bf16, int8)
    command = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--run-contestant",
        name,
        "--offload-folder",
        str(offload),
    ]
    print(f"running {name} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"  {name} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return None
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["logits"] = torch.load(offload / f"{name}.logits.pt")
    drop_page_cache(offload)
    return result


def median_of(rounds: list[dict[str, dict[str, Any]]], name: str, key: str) -> float:
    """The median of ``key`` over the rounds where ``name`` ran."""
    return statistics.median(results[name][key] for results in rounds if name in results)


def print_large(
    rounds: list[dict[str, dict[str, Any]]], config: dict[str, Any], args: argparse.Namespace
) -> None:
    print(
        f"\nQwen3-MoE-shaped, {config['num_hidden_layers']} layers, expert budget {args.budget}, "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
        f"(accelerate: {decoded_tokens(args, 'accelerate')}), batch 1, cold page cache, "
        f"medians of {len(rounds)} round-robin rounds"
    )
    header = f"{'contestant':14} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} "
    header += f"{'peak RSS GiB':>13} {'read MB/token':>14} {'hit rate':>9}"
    print(header)
    names = [name for name in args.contestants if any(name in results for results in rounds)]
    for name in names:
        hit = f"{median_of(rounds, name, 'hit_rate'):.0%}" if "hit_rate" in rounds[0].get(name, {}) else "-"
        prefill, decode = median_of(rounds, name, "prefill_tok_s"), median_of(rounds, name, "decode_tok_s")
        print(
            f"{name:14} {median_of(rounds, name, 'load_s'):7.1f} {prefill:14.2f} {decode:13.3f} "
            f"{median_of(rounds, name, 'peak_rss') / 2**30:13.2f} "
            f"{median_of(rounds, name, 'decode_read_per_token') / 1e6:14.1f} {hit:>9}"
        )
    accelerate = next((results["accelerate"] for results in rounds if "accelerate" in results), None)
    if accelerate is not None:
        print(
            f"(accelerate left {accelerate.get('disk_modules', 0)} of {accelerate.get('modules', 0)} "
            "modules of its device map on disk)"
        )
    pairs = [
        ("flexmoe-bf16", "accelerate"),
        ("flexmoe-bf16", "mmap"),
        ("flexmoe-int8", "accelerate"),
        ("flexmoe-int8", "mmap"),
        ("flexmoe-int8", "flexmoe-bf16"),
        ("flexmoe-int8-linear", "accelerate"),
        ("flexmoe-int8-linear", "mmap"),
        ("flexmoe-int8-linear", "flexmoe-bf16"),
    ]
    print("\nratios: median over rounds of the ratio within a round (range)")
    for a, b in pairs:
        both = [results for results in rounds if a in results and b in results]
        if not both:
            continue
        parts = []
        for key, label in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            ratios = [results[a][key] / results[b][key] for results in both]
            parts.append(f"{label} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"  {a} / {b}: " + ", ".join(parts))
    for name, what in (("flexmoe-int8", "int8 experts"), ("flexmoe-int8-linear", "int8 experts and linear")):
        both = [results for results in rounds if name in results and "flexmoe-bf16" in results]
        if not both:
            continue
        int8, bf16 = both[0][name]["logits"], both[0]["flexmoe-bf16"]["logits"]
        error = (int8 - bf16).abs()
        print(
            f"  {what} vs bf16, last prompt position: logits max |diff| {error.max():.4f}, "
            f"mean {error.mean():.4f} (logit std {bf16.std():.3f}); "
            f"same argmax: {bool(int8.argmax() == bf16.argmax())}"
        )


def matrix_vector_rates(config: dict[str, Any], rounds: int = 7) -> dict[str, float] | None:
    """GB/s of one-row products with an expert's ``w_in`` ``[2F, D]``, and of reading its bytes.

    Decoding is matrix-vector products. ``bf16 experts``: bf16 experts as the cache
    serves them (plain on the row kernels where they run, else packed); ``bf16 dense``:
    the attention's and head's weights as ``load_offloaded`` holds them (``RowsLinear``
    on the row kernels where they run, else ``PackedLinear``); ``bf16 packed``: oneDNN's
    packed product, for comparison; ``int8``: int8 experts; ``read``: a sum over the same
    bytes, the rate memory delivers them at. The weights span more than the CPU's
    caches, as the experts do. Interleaved rounds, medians. ``None`` where packed bf16
    products are not supported.
    """
    if not packed_inference_supported(torch.device("cpu"), torch.bfloat16):
        return None
    out_dim, in_dim = 2 * config["moe_intermediate_size"], config["hidden_size"]
    count = max(4, (256 << 20) // (2 * out_dim * in_dim))  # 256 MiB of bf16 weights
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_dim, in_dim, generator=generator).to(torch.bfloat16) for _ in range(count)]
    packed = [PackedWeight.pack(w) for w in weights]
    plain = decodes_plain(torch.bfloat16)
    linears = [nn.Linear(in_dim, out_dim, bias=False, device="meta") for _ in weights]
    for linear, w in zip(linears, weights, strict=True):
        linear.weight = nn.Parameter(w, requires_grad=False)
    dense = [RowsLinear.of(linear) if plain else PackedLinear.of(linear) for linear in linears]
    forms: dict[str, tuple[list[Any], Callable[[Tensor, Any], Any], int]] = {
        "bf16 experts": (weights if plain else packed, served_linear, 2),
        "bf16 dense": (dense, lambda x, layer: layer(x), 2),
        "bf16 packed": (packed, served_linear, 2),
        "int8": ([Int8Weight.quantize(w.float()) for w in weights], int8_linear, 1),
        "read": ([w.view(torch.float32) for w in weights], lambda _, w: w.sum(), 2),
    }
    x = torch.randn(1, in_dim, generator=generator).to(torch.bfloat16)
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up
            for name, (stored, linear, _) in forms.items():
                start = time.perf_counter()
                for w in stored:
                    linear(x, w)
                seconds[name].append(time.perf_counter() - start)
    return {
        name: count * out_dim * in_dim * size / statistics.median(seconds[name][1:]) / 1e9
        for name, (_, _, size) in forms.items()
    }


def product_bytes_per_token(config: dict[str, Any]) -> tuple[int, int]:
    """``(expert bytes, other bytes)`` of bf16 weights one decoded token's products read.

    The experts: top-k experts' three projections in every layer. The rest: the
    attention's four projections in every layer and the output head (untied).
    """
    D, F, layers = config["hidden_size"], config["moe_intermediate_size"], config["num_hidden_layers"]
    q_width = config["num_attention_heads"] * config["head_dim"]
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    experts = layers * config["num_experts_per_tok"] * 3 * D * F * 2
    attention = layers * (2 * D * q_width + 2 * D * kv_width) * 2
    return experts, attention + config["vocab_size"] * D * 2


def decode_bound(rates: dict[str, float], config: dict[str, Any]) -> float:
    """The most int8 experts can gain over bf16 ones in decode, were a step nothing but its products.

    Each product reads its weights at its kernel's rate; the attention and the head stay
    bf16. Anything else a step does (the same for both) only brings the ratio closer to 1.
    """
    experts, other = product_bytes_per_token(config)
    int8_s = other / rates["bf16 dense"] / 1e9 + experts / 2 / rates["int8"] / 1e9
    return products_seconds(rates, config) / int8_s


def products_seconds(rates: dict[str, float], config: dict[str, Any]) -> float:
    """Seconds a bf16 decode step spends in its products, each reading its weights at its kernel's rate."""
    experts, other = product_bytes_per_token(config)
    return experts / rates["bf16 experts"] / 1e9 + other / rates["bf16 dense"] / 1e9


def roofline_bound(config: dict[str, Any]) -> float:
    """``decode_bound`` for kernels that all read at the rate memory delivers: bytes alone."""
    experts, other = product_bytes_per_token(config)
    return (experts + other) / (experts / 2 + other)


class _NoMoE(nn.Module):
    """A decoder layer's MoE block that does nothing: what the rest of the layer costs."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros_like(x)


def model_work_seconds(config: dict[str, Any], steps: int = 40) -> float:
    """Seconds of a decode step outside its products and its MoE blocks, in ``transformers``' modules.

    The same architecture (layers, heads, norms, rotary embedding, KV cache) at hidden
    size 64, so that its products take no time, with every MoE block doing nothing: the
    work any MoE implementation inside this model leaves to the rest of each step.
    Median over ``steps`` decode steps after a 64-token prompt.
    """
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    small = {
        "hidden_size": 64,
        "head_dim": 8,
        "moe_intermediate_size": 8,
        "num_experts": 8,
        "vocab_size": 512,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen3MoeConfig(**{**config, **small}), dtype=torch.bfloat16
    ).eval()
    for layer in model.model.layers:
        layer.mlp = _NoMoE()
    seconds = []
    with torch.no_grad():
        out = model(torch.randint(0, 512, (1, 64)), use_cache=True)
        for _ in range(steps + 5):
            token = out["logits"][:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(token, use_cache=True, **kv_cache(model, out))
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[5:])


class _ProductsOnly(nn.Module):
    """A decoder layer's MoE block that computes ``k`` fixed experts' products and nothing else.

    A decoding token's row goes to each of its experts in one call of the row kernels,
    and the outputs are summed: the least any MoE block does per token (no routing, no
    cache, the experts in memory). A prompt gets zeros (only decode steps are timed).
    """

    def __init__(self, experts: list[tuple[Tensor, Tensor]], activation: str) -> None:
        super().__init__()
        self.experts, self.activation = experts, activation
        self.starts = np.arange(len(experts), dtype=np.int64)
        self.counts = np.ones(len(experts), dtype=np.int64)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.numel() != x.shape[-1]:
            return torch.zeros_like(x)
        rows = x.reshape(1, -1).expand(len(self.experts), -1).contiguous()
        y = torch.empty_like(rows)
        experts_bf16_at(rows, self.starts, self.counts, self.experts, self.activation, None, y)
        return y.sum(0).reshape(x.shape)


def products_only_model(bf16: Path, budget: int | None) -> nn.Module:
    """The large model as ``load_offloaded`` builds it, each MoE block replaced by a ``_ProductsOnly``.

    The same attention and head products; ``k`` random bf16 experts per block held in
    memory (as many bytes per token as a real step reads) and no prediction: every
    other part of a decode step (``transformers``' own work) runs as it does between
    the kernels, which is slower than alone.
    """
    model = flexmoe.hf.load_offloaded(bf16, expert_budget=budget, dtype=torch.bfloat16)
    config = model.config
    D, F, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    layers = model.model.layers
    activation = layers[0].mlp.moe.experts.activation
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        experts = [
            (
                torch.randn(2 * F, D, generator=generator).bfloat16(),
                torch.randn(D, F, generator=generator).bfloat16(),
            )
            for _ in range(k)
        ]
        if not takes_experts_bf16_at(
            torch.empty(k, D, dtype=torch.bfloat16), np.ones(k, np.int64), experts, activation
        ):
            raise RuntimeError("products-only: the row kernels do not run here")
        layer._forward_pre_hooks.clear()  # the predictions of the replaced blocks' experts
        layer.mlp = _ProductsOnly(experts, activation)
    return model


def print_products_only(rounds: list[dict[str, dict[str, Any]]]) -> None:
    """Print each round's products-only step against that round's ``accelerate`` and flexmoe bf16."""
    timed = [results for results in rounds if PRODUCTS_ONLY in results]
    if not timed:
        return

    def spread(values: list[float], unit: str = "x") -> str:
        return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"

    seconds = [1 / results[PRODUCTS_ONLY]["decode_tok_s"] for results in timed]
    print(
        f"  a decode step whose MoE blocks only compute their experts' products (no routing, no cache), "
        f"the rest of the model as it runs between the kernels: {statistics.median(seconds) * 1e3:.0f} ms "
        f"({min(seconds) * 1e3:.0f}-{max(seconds) * 1e3:.0f} over the rounds)"
    )
    for name in ("accelerate", "flexmoe-bf16"):
        pairs = [
            (results[name]["decode_tok_s"], results[PRODUCTS_ONLY]["decode_tok_s"])
            for results in timed
            if name in results
        ]
        if not pairs:
            continue
        if name == "accelerate":
            print(f"    at most {spread([bound / speed for speed, bound in pairs])} accelerate's rate")
        else:
            shares = [100 * speed / bound for speed, bound in pairs]
            print(f"    flexmoe bf16 decodes at {spread(shares, ' %')} of it")


def median_rates(round_rates: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each kernel's median rate over the rounds (``None`` where none were measured)."""
    measured = [rates for rates in round_rates if rates is not None]
    if not measured:
        return None
    return {name: statistics.median(rates[name] for rates in measured) for name in measured[0]}


def print_step_floor(
    rounds: list[dict[str, dict[str, Any]]],
    round_rates: list[dict[str, float] | None],
    config: dict[str, Any],
) -> float | None:
    """Print the least time a bf16 decode step can take here; return its median (``None``: no rates).

    Each round's floor takes that round's kernel rates (measured right after its
    contestants) and is compared with that round's ``accelerate`` and flexmoe bf16.
    """
    measured = [rates for rates in round_rates if rates is not None]
    if len(measured) < len(round_rates):
        return None
    rest = model_work_seconds(config)
    floors = [products_seconds(rates, config) + rest for rates in measured]
    reading = [sum(product_bytes_per_token(config)) / rates["read"] / 1e9 + rest for rates in measured]

    def spread(values: list[float], unit: str = "x") -> str:
        return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"

    floor = statistics.median(floors)
    print(
        f"  a bf16 decode step takes at least {floor * 1e3:.0f} ms ({min(floors) * 1e3:.0f}-"
        f"{max(floors) * 1e3:.0f} over the rounds): its products at the round's measured rates + "
        f"{rest * 1e3:.0f} ms of transformers' own work besides the MoE blocks; with products that read "
        f"as fast as memory delivers, {statistics.median(reading) * 1e3:.0f} ms"
    )
    for name in ("accelerate", "flexmoe-bf16"):
        pairs = [
            (results[name]["decode_tok_s"], floor_r)
            for results, floor_r in zip(rounds, floors, strict=True)
            if name in results
        ]
        if not pairs:
            continue
        if name == "accelerate":
            bounds = [1 / f / speed for speed, f in pairs]
            print(f"    any MoE implementation here decodes at most {spread(bounds)} accelerate's rate")
        else:
            shares = [100 * speed * f for speed, f in pairs]
            print(f"    flexmoe bf16 decodes at {spread(shares, ' %')} of the floor's rate")
    return floor


def print_matrix_vector_bound(rates: dict[str, float] | None, config: dict[str, Any]) -> None:
    if rates is None:
        return
    experts, other = product_bytes_per_token(config)
    print(
        f"  one-row products with w_in [{2 * config['moe_intermediate_size']}, {config['hidden_size']}]: "
        f"bf16 experts {rates['bf16 experts']:.1f} GB/s, bf16 attention and head {rates['bf16 dense']:.1f} "
        f"GB/s (packed: {rates['bf16 packed']:.1f}), int8 {rates['int8']:.1f} GB/s, reading the bytes "
        f"{rates['read']:.1f} GB/s; int8 is at most {2 * rates['int8'] / rates['bf16 experts']:.2f}x bf16 "
        f"per product. A decoded token's products read {experts / 1e9:.2f} GB of bf16 experts and "
        f"{other / 1e9:.2f} GB of bf16 attention and head, so int8 experts decode at most "
        f"{decode_bound(rates, config):.2f}x faster than bf16 ones at these rates, and at most "
        f"{roofline_bound(config):.2f}x with any kernels (were a step nothing but products)"
    )


# ---------------------------------------------------------------- part 2: the trained model's routing


class MemoryStore:
    """An ``ExpertStore`` over one model's in-memory experts: ``(layer, e) -> (w_in[e], w_out[e])``."""

    def __init__(self, layers: list[MoELayer]) -> None:
        self.weights = [(layer.experts.w_in.detach(), layer.experts.w_out.detach()) for layer in layers]

    def nbytes(self, key: ExpertKey) -> int:
        w_in, w_out = self.weights[key[0]]
        return (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()

    def read(self, key: ExpertKey) -> ExpertWeights:
        w_in, w_out = self.weights[key[0]]
        return w_in[key[1]].clone(), w_out[key[1]].clone()


def trained_run(args: argparse.Namespace) -> Path:
    """``--trained``, else a run of ``flexmoe train`` made (once) under the cache folder."""
    if args.trained:
        return Path(args.trained)
    options = ["--steps", str(args.train_steps)]
    if args.tiny:
        options += ["--dim", "64", "--expert-hidden", "64", "--context", "64", "--batch-size", "8"]
    digest = hashlib.sha256(" ".join(options).encode()).hexdigest()[:10]
    run = Path(args.cache_dir).expanduser() / f"trained-{digest}"
    if not (run / "summary.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        print(f"training the main job's model: flexmoe train {' '.join(options)} --run-dir {run}", flush=True)
        command = [sys.executable, "-m", "flexmoe", "train", *options, "--run-dir", str(run), "--no-progress"]
        subprocess.run(command, check=True, capture_output=True)
    return run


def load_trained(run: Path) -> TinyMoELM:
    settings = json.loads((run / "config.json").read_text())
    settings = settings.get("config", settings)
    config = TinyMoELMConfig(
        context=settings["context"],
        dim=settings["dim"],
        num_layers=settings["layers"],
        num_heads=settings["heads"],
        num_experts=settings["experts"],
        top_k=settings["top_k"],
        expert_hidden_dim=settings["expert_hidden"],
    )
    model = TinyMoELM(config)
    load_checkpoint(run / "checkpoints", model)
    return model.eval()


def moe_inputs(model: TinyMoELM, tokens: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The logits, each MoE layer's input ``[B, L, D]``, and the prediction's input for each layer.

    The prediction's input is what ``load_offloaded`` gives the router at the start of a
    decoder layer: the block's input (the residual stream the previous block left),
    normalised by the norm that will normalise the MoE layer's own input.
    """
    inputs: list[Tensor] = []
    blocks: list[Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, a: inputs.append(a[0].detach()))
        for layer in model.moe_layers()
    ]
    hooks += [
        block.register_forward_pre_hook(lambda _, a: blocks.append(a[0].detach())) for block in model.blocks
    ]
    try:
        with torch.no_grad():
            logits = model(tokens)
            predictions = [block.norm_moe(x) for block, x in zip(model.blocks, blocks, strict=True)]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, inputs, predictions


def replay_decode(
    layers: list[MoELayer],
    inputs: list[Tensor],
    predictions: list[Tensor],
    policy: str,
    budget_experts: int,
    confidence: float,
    min_precision: float,
) -> Any:
    """Drive an ``ExpertCache`` as decoding with ``load_offloaded`` does: token by token, layer by layer.

    Before each layer but the first, its router applied to the residual stream the
    previous layer left (``predictions``) predicts its experts, which are read ahead
    (assumed to land during the layer's attention); then the layer runs on its real
    input, its experts read through the cache.
    """
    store = MemoryStore(layers)
    cache = ExpertCache(store, len(layers), budget_experts * store.nbytes((0, 0)), policy, prefetch=True)
    for index, layer in enumerate(layers):
        strategy = offload_experts(layer, cache, index, store.nbytes((index, 0)))
        strategy.confidence, strategy.min_precision = confidence, min_precision
    B, L, _ = inputs[0].shape
    with torch.no_grad():
        for b in range(B):
            for t in range(L):
                for index, layer in enumerate(layers):
                    if index > 0:
                        prefetch_experts(layer, predictions[index][b, t : t + 1])
                        cache.wait_for_reads()  # the prefetch lands while the attention computes
                    layer(inputs[index][b, t : t + 1])  # its experts through the cache
    cache.close()
    return cache.stats


def int8_roundtrip(model: TinyMoELM, linear: bool) -> TinyMoELM:
    """A copy whose expert weights are replaced by their int8 values (per output channel).

    ``linear``: its untied linear layers held as int8 too (``quantize_linear_layers``).
    """
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for layer in quantized.moe_layers():
            for weight in (layer.experts.w_in, layer.experts.w_out):
                q, scale = quantize_int8(weight)
                weight.copy_(q.float() * scale.unsqueeze(-1))
    if linear:
        flexmoe.hf.quantize_linear_layers(quantized)
    return quantized


def int8_quality(
    model: TinyMoELM, tokens: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor, linear: bool
) -> dict[str, float]:
    """Perplexity and logit error of the int8 copy (``int8_roundtrip``) against the trained weights."""
    with torch.no_grad():
        int8_logits = int8_roundtrip(model, linear)(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    int8_loss = F.cross_entropy(int8_logits.flatten(0, 1), targets.flatten()).item()
    error = (int8_logits - logits).abs()
    quality = {
        "perplexity": math.exp(loss),
        "int8_perplexity": math.exp(int8_loss),
        "logit_max_error": error.max().item(),
        "logit_mean_error": error.mean().item(),
        "logit_std": logits.std().item(),
        "same_argmax": (int8_logits.argmax(-1) == logits.argmax(-1)).float().mean().item(),
    }
    what = "int8 experts and linear layers" if linear else "int8 experts"
    print(
        f"{what} on this text: perplexity {quality['perplexity']:.4f} -> "
        f"{quality['int8_perplexity']:.4f} "
        f"({quality['int8_perplexity'] / quality['perplexity'] - 1:+.3%}), logits max |diff| "
        f"{quality['logit_max_error']:.4f}, mean {quality['logit_mean_error']:.5f} "
        f"(logit std {quality['logit_std']:.2f}), same argmax {quality['same_argmax']:.2%}"
    )
    return quality


def trained_routing(args: argparse.Namespace) -> dict[str, Any]:
    run = trained_run(args)
    model = load_trained(run)
    corpus = stdlib_corpus()
    tokens, targets = corpus.batch(
        "val", args.windows, model.config.context, torch.Generator().manual_seed(0)
    )
    logits, inputs, predictions = moe_inputs(model, tokens)
    total = len(model.blocks) * model.config.num_experts
    budget = max(total // 4, model.config.top_k)
    print(
        f"\ntrained model {run}: {len(model.blocks)} layers x {model.config.num_experts} experts, "
        f"top-{model.config.top_k}; budget {budget} experts (a quarter); "
        f"{args.windows} held-out windows of {model.config.context} bytes, decoded one token at a time; "
        f"prefetch confidence {args.prefetch_confidence}, min precision {args.prefetch_min_precision}"
    )
    print(
        f"{'policy':11} {'hit rate':>9} {'precision':>10} {'recall':>7} "
        f"{'reads used':>11} {'reads/token':>12}"
    )
    policies = {}
    for policy in POLICIES:
        # each policy on a fresh copy: replaying offloads the copy's experts
        layers = copy.deepcopy(model).moe_layers()
        stats = replay_decode(
            layers, inputs, predictions, policy, budget, args.prefetch_confidence, args.prefetch_min_precision
        )
        steps = tokens.numel()
        policies[policy] = {
            "hit_rate": stats.hit_rate,
            "precision": stats.prefetch_precision,
            "recall": stats.prefetch_recall,
            "prefetch_use_rate": stats.prefetch_use_rate,
            "reads_per_token": stats.reads / steps,
        }
        print(
            f"{policy:11} {stats.hit_rate:9.1%} {stats.prefetch_precision:10.1%} "
            f"{stats.prefetch_recall:7.1%} {stats.prefetch_use_rate:11.1%} {stats.reads / steps:12.2f}"
        )
    return {
        "run": str(run),
        "budget_experts": budget,
        "prefetch_confidence": args.prefetch_confidence,
        "prefetch_min_precision": args.prefetch_min_precision,
        "policies": policies,
        "int8": int8_quality(model, tokens, targets, logits, linear=False),
        "int8_linear": int8_quality(model, tokens, targets, logits, linear=True),
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a check that everything runs")
    parser.add_argument(
        "--cache-dir", default="~/.cache/flexmoe-bench", help="where the generated models live"
    )
    parser.add_argument(
        "--experts-gb", type=float, default=30.0, help="bf16 expert bytes of the large model (GB)"
    )
    parser.add_argument("--layers", type=int, default=None, help="layers (default: from --experts-gb)")
    parser.add_argument("--budget", default=None, help="expert budget (default 8GiB; --tiny: 256KiB)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=None, help="prefill length (default 64; --tiny 16)"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 32; --tiny 8)")
    parser.add_argument(
        "--accelerate-new-tokens",
        type=int,
        default=8,
        help="tokens accelerate decodes (each step reads its offloaded layers whole; default 8)",
    )
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS))
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="round-robin rounds of every contestant (default 3; --tiny 1)",
    )
    parser.add_argument("--trained", default=None, help="a flexmoe train run directory (default: train one)")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="steps if training (default 400; --tiny 30)"
    )
    parser.add_argument("--windows", type=int, default=None, help="held-out windows (default 16; --tiny 2)")
    parser.add_argument(
        "--prefetch-confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"part 2: read a predicted expert only if its router probability is >= this / E "
        f"(default {DEFAULT_CONFIDENCE}; 0: the whole predicted top-k)",
    )
    parser.add_argument(
        "--prefetch-min-precision",
        type=float,
        default=DEFAULT_MIN_PRECISION,
        help="part 2: read a predicted expert only if this fraction of its past predictions was used "
        f"(default {DEFAULT_MIN_PRECISION}; 0: always)",
    )
    parser.add_argument("--skip-large", action="store_true", help="only part 2 (the trained model)")
    parser.add_argument("--skip-trained", action="store_true", help="only part 1 (the large model)")
    parser.add_argument("--prepare-only", action="store_true", help="generate the model files and stop")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--run-contestant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offload-folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.tiny
    args.budget = args.budget or ("256KiB" if tiny else "8GiB")
    args.prompt_tokens = args.prompt_tokens or (16 if tiny else 64)
    args.new_tokens = args.new_tokens or (8 if tiny else 32)
    args.train_steps = args.train_steps or (30 if tiny else 400)
    args.windows = args.windows or (2 if tiny else 16)
    args.rounds = args.rounds or (1 if tiny else 3)
    if tiny and args.layers is None:
        args.layers = 4
    return args


def main() -> None:
    args = parse_args()
    if args.run_contestant:
        run_contestant(args)
        return
    if args.prepare_only:
        prepare(args)
        return
    print(json.dumps(environment()))
    payload: dict[str, Any] = {"environment": environment()}
    if not args.skip_large:
        payload["large"] = large_model(args)
    if not args.skip_trained:
        payload["trained"] = trained_routing(args)
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
