"""Expert adapters: LoRA fine-tuning with flexmoe against ``transformers`` + PEFT (and, wired in, serving).

``--part finetune`` (the default): one Qwen3-MoE-shaped model (64 experts, top-8, fp32,
small dims and layers by default so that a run takes minutes on a laptop), the same
weights in both contestants:

- ``flexmoe``: the model converted with ``flexmoe.hf.convert``, ``add_lora(rank=8)`` on
  every expert layer (fused experts, LoRA terms on the grouped segments);
- ``peft``: the unconverted model with PEFT's ``LoraConfig(target_parameters=[
  "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`` (LoRA on the fused expert
  Parameters), the adapter loaded from the files flexmoe saved, so that both start from
  the same adapter; the first loss is checked equal before timing.

A step is forward, loss, backward and an AdamW step over the adapter (base frozen),
on random token ids. Steps are timed in interleaved rounds (``harness.measure_interleaved``):
medians, min/max, and the paired ratio (median over rounds of PEFT's time / flexmoe's).
Peak memory is measured per contestant in its own fresh subprocess: ``ru_maxrss`` after
the same imports and the steps, and the rise over the resident size after building the
model (what training adds). The targets (``>= 1.5x`` steps/s, no more peak memory) are
printed with the result.

``--part serving`` runs the many-adapters serving benchmark (``adapters_serving.py``:
a mixed batch over ``--serving-adapters`` LoRA and ESFT adapters against the base alone)
on the same shape, ``--part all`` both.

    python benchmarks/adapters.py                        # fine-tuning, defaults
    python benchmarks/adapters.py --layers 1 --steps 2 --rounds 2   # a quick check
    python benchmarks/adapters.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import PeftModel
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import adapters_serving
import flexmoe.hf
from flexmoe.adapters import add_lora, save_peft_adapter
from harness import environment, measure_interleaved, write_json

CONTESTANTS = ("flexmoe", "peft")
PEFT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def model_config(args: argparse.Namespace) -> Qwen3MoeConfig:
    """The Qwen3-MoE shape of the run (every layer an MoE layer)."""
    return Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=4 * args.dim,
        moe_intermediate_size=args.expert_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.dim // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(64, args.seq),
        tie_word_embeddings=False,
    )


def base_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model: torch.nn.Module = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.float32)
    return model.train()


def flexmoe_model(args: argparse.Namespace) -> torch.nn.Module:
    """The converted model with a LoRA adapter on every expert layer (B drawn, as if trained)."""
    model = base_model(args)
    flexmoe.hf.convert(model)
    add_lora(model, rank=args.rank, alpha=2 * args.rank)
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora.B_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


def peft_model(args: argparse.Namespace, adapter_dir: Path) -> torch.nn.Module:
    """The unconverted model with PEFT's ``target_parameters`` LoRA, loaded from flexmoe's adapter files."""
    model = PeftModel.from_pretrained(base_model(args), str(adapter_dir), is_trainable=True)
    return model.train()


def ensure_adapter(args: argparse.Namespace, adapter_dir: Path) -> None:
    """flexmoe's adapter in PEFT's files: what both contestants start from."""
    if not (adapter_dir / "adapter_config.json").exists():
        save_peft_adapter(flexmoe_model(args), adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targeted = config["target_parameters"]
    assert config["r"] == args.rank and all(any(t.endswith(x) for t in targeted) for x in PEFT_TARGETS)


def build(name: str, args: argparse.Namespace, adapter_dir: Path) -> torch.nn.Module:
    return flexmoe_model(args) if name == "flexmoe" else peft_model(args, adapter_dir)


def train_step_fn(model: torch.nn.Module, args: argparse.Namespace) -> Any:
    """One fine-tuning step: forward, loss, backward, AdamW over the adapter."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in trainable)


def first_loss(model: torch.nn.Module, args: argparse.Namespace) -> float:
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def memory_worker(name: str, args: argparse.Namespace, adapter_dir: Path) -> None:
    """In a fresh subprocess: build one contestant, run the steps, print its peak memory as JSON."""
    model = build(name, args, adapter_dir)
    built = _rss_kib()
    step, _ = train_step_fn(model, args)
    for _ in range(args.steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mib": peak / 1024, "training_rise_mib": (peak - built) / 1024}))


def peak_memory(name: str, argv: list[str], adapter_dir: Path) -> dict[str, float]:
    command = [sys.executable, __file__, *argv, "--memory-of", name, "--adapter-dir", str(adapter_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_finetune(args: argparse.Namespace, argv: list[str], adapter_dir: Path) -> dict[str, Any]:
    ensure_adapter(args, adapter_dir)
    models = {name: build(name, args, adapter_dir) for name in CONTESTANTS}
    losses = {name: first_loss(model, args) for name, model in models.items()}
    if abs(losses["flexmoe"] - losses["peft"]) > 1e-4 * max(1.0, abs(losses["peft"])):
        raise SystemExit(f"the contestants compute different losses: {losses}")
    steps, counts = {}, {}
    for name, model in models.items():
        steps[name], counts[name] = train_step_fn(model, args)
    if counts["flexmoe"] != counts["peft"]:
        raise SystemExit(f"the contestants train different parameter counts: {counts}")
    timings = measure_interleaved(
        {name: lambda fn=fn: [fn() for _ in range(args.steps)] for name, fn in steps.items()},
        warmup=1,
        repeats=args.rounds,
    )
    memory = {name: peak_memory(name, argv, adapter_dir) for name in CONTESTANTS}
    speedup = timings["flexmoe"].paired_speedup(timings["peft"])
    result = {
        "config": vars(args),
        "adapter_parameters": counts["flexmoe"],
        "first_loss": losses,
        "steps_per_s": {name: args.steps / t.median for name, t in timings.items()},
        "timings": timings,
        "paired_speedup": speedup,
        "memory": memory,
    }
    print_finetune(args, result)
    return result


def print_finetune(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print(
        f"LoRA fine-tuning, Qwen3-MoE shape: {args.layers} layers, dim {args.dim}, {args.experts} experts "
        f"top-{args.top_k}, expert hidden {args.expert_hidden}, rank {args.rank}, fp32, "
        f"batch {args.batch}x{args.seq}; {result['adapter_parameters']} adapter parameters"
    )
    for name in CONTESTANTS:
        timing, memory = result["timings"][name], result["memory"][name]
        print(
            f"  {name:8s} {result['steps_per_s'][name]:7.2f} steps/s  ({args.steps} steps: {timing})  "
            f"peak RSS {memory['peak_rss_mib']:8.1f} MiB (training adds {memory['training_rise_mib']:7.1f})"
        )
    speedup = result["paired_speedup"]
    mem = result["memory"]
    ratio = mem["flexmoe"]["peak_rss_mib"] / mem["peft"]["peak_rss_mib"]
    print(f"  flexmoe / peft: {speedup:.2f}x steps/s (paired median; target >= 1.5x: {speedup >= 1.5})")
    print(f"  peak memory flexmoe / peft: {ratio:.3f} (target <= 1: {ratio <= 1.0})")


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    """The many-adapters serving part (``benchmarks/adapters_serving.py``) on this run's shape."""
    return adapters_serving.run_serving(
        adapters=args.serving_adapters,
        lora_rank=args.rank,
        layers=args.layers,
        hidden=args.dim,
        expert_hidden=args.expert_hidden,
        batch=args.serving_batch,
        repeats=args.rounds,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["finetune", "serving", "all"], default="finetune")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--expert-hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serving-adapters", type=int, default=20, help="adapters in the mixed serving batch")
    p.add_argument("--serving-batch", type=int, default=40, help="sequences in the mixed serving batch")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--memory-of", choices=CONTESTANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


MODEL_FLAGS = (
    "layers",
    "dim",
    "expert_hidden",
    "experts",
    "top_k",
    "rank",
    "vocab",
    "batch",
    "seq",
    "steps",
    "seed",
)


def model_flags(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild this run's model and steps (for the memory subprocesses)."""
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in MODEL_FLAGS]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.memory_of is not None:
        memory_worker(args.memory_of, args, args.adapter_dir)
        return
    results: dict[str, Any] = {"environment": environment()}
    if args.part in ("finetune", "all"):
        with tempfile.TemporaryDirectory() as folder:
            results["finetune"] = run_finetune(args, model_flags(args), Path(folder))
    if args.part in ("serving", "all"):
        results["serving"] = run_serving(args)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
