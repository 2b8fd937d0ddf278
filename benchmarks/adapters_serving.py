"""Serving many adapters on one base (ExpertWeave): a mixed batch over 20 adapters against the base alone.

A Qwen3-MoE-shaped ``transformers`` model (64 experts, top-8, small dimensions) is
converted with ``flexmoe.hf.convert``; 20 adapters are added to one ``ExpertWeave``:
half LoRA (rank 8, ``w_in`` and ``w_out`` of every expert of every layer), half ESFT
(each layer's experts chosen by ``esft_select`` on random task data at ``--threshold``).
Every sequence of the batch uses one adapter, round-robin over the 20.

Printed, per shape (prefill ``[B, S]`` and a decode-shaped ``[B, 1]`` forward without a
KV cache): the median latency of the base alone and of the mixed batch, timed in
interleaved rounds, and the paired overhead (median over rounds of mixed / base within
a round; target <= +15 %) with the range of the per-round overheads (a wide range means
the machine was busy: rerun with nothing else running). Memory, counted in bytes
exactly: the base's parameters and buffers, the adapters' own parameters, what the
weave holds (its stacks and expert maps), and (base + weave) / (base + adapters)
(target within 5 %); on CUDA also the allocator's growth when the adapters were added.

    python benchmarks/adapters_serving.py                       # CPU, fp32
    python benchmarks/adapters_serving.py --prepared            # base experts packed (CPU)
    python benchmarks/adapters_serving.py --device cuda --json out.json   # bf16 on CUDA
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flexmoe.hf
from flexmoe.adapters import ESFTAdapter, ESFTExperts, ExpertLoRA, ExpertWeave, esft_select, use
from flexmoe.adapters.esft import experts_of_layers
from harness import environment, measure, measure_interleaved, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def qwen3_moe_shaped(layers: int, hidden: int, expert_hidden: int, device: str, dtype: torch.dtype) -> Any:
    """A random Qwen3-MoE causal LM with 64 experts, top-8, converted to flexmoe."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=expert_hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    flexmoe.hf.convert(model)
    return model


def lora_adapter(model: Any, rank: int, seed: int) -> dict[str, ExpertLoRA]:
    """A LoRA adapter of every expert of every layer, with non-zero (random) factors."""
    torch.manual_seed(seed)
    adapters = {}
    for path, (_, experts) in experts_of_layers(model).items():
        w_in = experts.w_in
        lora = ExpertLoRA(
            experts.num_experts,
            experts.dim,
            w_in.shape[1],
            experts.hidden_dim,
            rank,
            alpha=2.0 * rank,
            device=w_in.device,
            dtype=w_in.dtype,
        )
        with torch.no_grad():
            for p in lora.parameters():
                p.normal_(0.0, 0.02)
        adapters[path] = lora
    return adapters


def esft_adapter(model: Any, threshold: float, seed: int, prompt: int) -> ESFTAdapter:
    """An ESFT adapter: the experts ``esft_select`` chooses on random task data, perturbed copies."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    task = torch.randint(1, model.config.vocab_size, (4, prompt), generator=generator).to(device)
    selection = esft_select(model, [task], threshold, score="token")
    layers = {}
    for path, (_, experts) in experts_of_layers(model).items():
        ids = list(selection[path])
        index = torch.tensor(ids, device=experts.w_in.device)
        w_in = experts.w_in.detach().index_select(0, index)
        w_out = experts.w_out.detach().index_select(0, index)
        layers[path] = ESFTExperts(
            tuple(ids), w_in + 0.01 * torch.randn_like(w_in), w_out + 0.01 * torch.randn_like(w_out)
        )
    return ESFTAdapter(layers, "token", threshold)


def add_adapter(
    weave: ExpertWeave, model: Any, kind: str, seed: int, rank: int, threshold: float, prompt: int
) -> int:
    """Make one adapter, add it to ``weave``, and return its own parameters' bytes (it is then dropped)."""
    if kind == "lora":
        lora = lora_adapter(model, rank, seed)
        weave.add_lora(lora)
        return sum(p.numel() * p.element_size() for m in lora.values() for p in m.parameters())
    esft = esft_adapter(model, threshold, seed, prompt)
    weave.add_esft(esft)
    return esft.num_bytes()


def forward(model: Any, tokens: torch.Tensor, ids: list[int] | None) -> Callable[[], None]:
    """One inference forward of ``tokens``, each sequence with its adapter (``None``: the base alone)."""

    def call() -> None:
        with torch.inference_mode(), use(model, ids):
            model(tokens)

    return call


def expert_bytes(weave: ExpertWeave, model: Any, tokens: torch.Tensor, ids: list[int]) -> tuple[int, int]:
    """Bytes of expert weights and LoRA factors one forward must read: ``(base alone, mixed batch)``.

    The base alone reads each base expert some token chose; the mixed batch reads the
    base experts its base and LoRA rows use, each ESFT expert with rows, and the factors
    of each LoRA slot with rows (every weight once). Both from the same routing (the
    base router serves every adapter), captured from one mixed forward.
    """
    chosen: dict[str, torch.Tensor] = {}
    hooks = [
        lw.layer.router.register_forward_hook(
            lambda _m, _i, out, path=path: chosen.__setitem__(path, out.expert_ids_TK)
        )
        for path, lw in weave.layers.items()
    ]
    try:
        forward(model, tokens, ids)()
    finally:
        for hook in hooks:
            hook.remove()
    base = mixed = 0
    for path, lw in weave.layers.items():
        experts = lw.experts
        one_expert = sum(t[0].numel() * t.element_size() for t in (experts.w_in, experts.w_out))
        expert_ids_TK = chosen[path]
        ids_T = torch.tensor(ids).repeat_interleave(expert_ids_TK.shape[0] // len(ids))
        virtual = torch.unique(lw.expert_map[(ids_T + 1)[:, None] * lw.num_experts + expert_ids_TK]).numpy()
        main, esft = virtual[virtual < lw.num_main], virtual[virtual >= lw.num_main]
        base += len(torch.unique(expert_ids_TK)) * one_expert
        mixed += (len(np.unique(lw.base_of_virtual[main])) + len(esft)) * one_expert
        for stack in lw.lora.values():
            used = np.isin(stack.virtual_ids, virtual)
            mixed += int(used.sum()) * (stack.A[0].numel() + stack.B[0].numel()) * stack.A.element_size()
    return base, mixed


def state_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype, t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run_serving(
    *,
    adapters: int = 20,
    lora_rank: int = 8,
    threshold: float = 0.2,
    layers: int = 2,
    hidden: int = 128,
    expert_hidden: int = 64,
    batch: int = 40,
    prompt: int = 32,
    repeats: int = 7,
    device: str = "cpu",
    dtype: str = "fp32",
    prepared: bool = False,
) -> dict[str, Any]:
    """The serving benchmark; returns its numbers (and prints them).

    ``prepared``: the base experts get their packed inference copies
    (``prepare_for_inference``), which the base and the weave's base rows then use.
    """
    model = qwen3_moe_shaped(layers, hidden, expert_hidden, device, DTYPES[dtype])
    if prepared:
        for _, experts in experts_of_layers(model).values():
            if not experts.prepare_for_inference():
                raise SystemExit(f"--prepared: no packed inference copies on {device} in {dtype}")
    base_bytes = state_bytes(model)
    on_cuda = device.startswith("cuda")
    allocated_before = torch.cuda.memory_allocated() if on_cuda else 0
    # 1. the adapters (built one at a time: only the weave's copy of each stays alive)
    weave = ExpertWeave(model)
    adapter_bytes = 0
    kinds = []
    for i in range(adapters):
        kinds.append("lora" if i % 2 == 0 else "esft")
        adapter_bytes += add_adapter(weave, model, kinds[-1], i, lora_rank, threshold, prompt)
    allocated_growth = torch.cuda.memory_allocated() - allocated_before if on_cuda else None
    weave_bytes = weave.adapter_bytes() + weave.index_bytes()
    memory_ratio = (base_bytes + weave_bytes) / (base_bytes + adapter_bytes)
    # 2. latency: the base alone and the mixed batch, interleaved rounds
    generator = torch.Generator().manual_seed(123)
    ids = [b % adapters for b in range(batch)]
    stream = torch.ones(64 * 2**20, device=device)  # 256 MiB, far past the caches: the read rate
    results: dict[str, Any] = {}
    for shape, length in (("prefill", prompt), ("decode", 1)):
        tokens = torch.randint(1, 1024, (batch, length), generator=generator).to(device)

        calls = {"base": forward(model, tokens, None), "mixed": forward(model, tokens, ids)}
        # the streaming read just before and just after the rounds (inside them it would
        # evict the weights the next contestant reads, one contestant more than the other)
        reads = [measure(lambda: stream.sum(), warmup=1, repeats=5, device=torch.device(device))]
        timings = measure_interleaved(calls, warmup=2, repeats=repeats, device=torch.device(device))
        reads.append(measure(lambda: stream.sum(), warmup=1, repeats=5, device=torch.device(device)))
        overhead = timings["base"].paired_speedup(timings["mixed"]) - 1.0
        rounds = [m / b - 1.0 for m, b in zip(timings["mixed"].samples, timings["base"].samples, strict=True)]
        # the adapters' own bytes at the streaming rate around the rounds: what no implementation avoids
        base_bytes_read, mixed_bytes_read = expert_bytes(weave, model, tokens, ids)
        rate = stream.numel() * stream.element_size() / statistics.mean(r.median for r in reads)
        floor = (mixed_bytes_read - base_bytes_read) / rate / timings["base"].median
        results[shape] = {
            "base": timings["base"],
            "mixed": timings["mixed"],
            "paired_overhead": overhead,
            "round_overheads": rounds,
            "expert_bytes": {"base": base_bytes_read, "mixed": mixed_bytes_read},
            "read_bytes_per_s": rate,
            "bytes_floor": floor,
        }
        print(f"{shape:8s} [{batch}, {length}]  base {timings['base']}")
        print(f"{'':8s} mixed over {adapters} adapters {timings['mixed']}")
        print(
            f"{'':8s} paired overhead {overhead * 100:+.1f} % (target <= +15 %; rounds "
            f"{min(rounds) * 100:+.1f} .. {max(rounds) * 100:+.1f} %)"
        )
        print(
            f"{'':8s} expert weights and factors read: base {base_bytes_read / 1e6:.1f} MB, mixed "
            f"{mixed_bytes_read / 1e6:.1f} MB; the difference at the streaming read timed around the rounds "
            f"({rate / 1e9:.1f} GB/s) alone adds {floor * 100:+.1f} % to the base"
        )
    esft_experts = sum(len(w.esft_slots) for w in weave.layers.values())
    print(
        f"memory: base {base_bytes / 2**20:.2f} MiB, "
        f"adapters' own parameters {adapter_bytes / 2**20:.2f} MiB "
        f"({kinds.count('lora')} LoRA r={lora_rank}, {kinds.count('esft')} ESFT with {esft_experts} experts "
        f"over {layers} layers), weave {weave_bytes / 2**20:.2f} MiB (maps {weave.index_bytes()} B)"
    )
    print(f"        (base + weave) / (base + adapters) = {memory_ratio:.4f} (target within 5 %)")
    print(f"        {adapters + 1} merged models would take {(adapters + 1) * base_bytes / 2**20:.2f} MiB")
    if allocated_growth is not None:
        print(f"        CUDA allocator growth while adding the adapters: {allocated_growth / 2**20:.2f} MiB")
    results["memory"] = {
        "base_bytes": base_bytes,
        "adapter_bytes": adapter_bytes,
        "weave_bytes": weave_bytes,
        "index_bytes": weave.index_bytes(),
        "ratio": memory_ratio,
        "cuda_allocated_growth": allocated_growth,
        "esft_experts": esft_experts,
    }
    results["config"] = {
        "adapters": adapters,
        "lora_rank": lora_rank,
        "threshold": threshold,
        "layers": layers,
        "hidden": hidden,
        "expert_hidden": expert_hidden,
        "experts": 64,
        "top_k": 8,
        "batch": batch,
        "prompt": prompt,
        "device": device,
        "dtype": dtype,
        "prepared": prepared,
    }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.2, help="ESFT share of the routing mass")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--expert-hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bf16 on CUDA (where torch._grouped_mm runs), else fp32",
    )
    parser.add_argument(
        "--prepared", action="store_true", help="the base experts' packed inference copies (CPU)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    print(environment())
    results = run_serving(
        adapters=args.adapters,
        lora_rank=args.lora_rank,
        threshold=args.threshold,
        layers=args.layers,
        hidden=args.hidden,
        expert_hidden=args.expert_hidden,
        batch=args.batch,
        prompt=args.prompt,
        repeats=args.repeats,
        device=args.device,
        dtype=dtype,
        prepared=args.prepared,
    )
    write_json(args.json, {"environment": environment(), "serving": results})


if __name__ == "__main__":
    main()
