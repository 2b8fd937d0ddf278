"""``flexmoe generate``: text from a ``transformers`` MoE model directory, its experts on disk if asked.

flexmoe generate MODEL_DIR --prompt "def main(" --max-new-tokens 64 --expert-budget 8GiB
flexmoe generate MODEL_DIR --prompt-ids 1,2,3 --routing-top-k 1 --json
flexmoe generate MODEL_DIR --prompt-ids 1,2,3 --routing-top-k 4,4,2,2   # one per MoE layer

With ``--expert-budget`` the model is loaded with ``flexmoe.hf.load_offloaded`` (experts
read from the ``safetensors`` files into a cache of that many bytes); without it, it is
loaded in memory and converted (``flexmoe.hf.convert``). ``--routing-top-k`` /
``--routing-top-p`` change the experts per token (``flexmoe.hf.set_routing``). Decoding
is greedy unless ``--sample``. While it decodes, a status line on a terminal shows
tokens/s, the cache's hit rate and the bytes read; then the text (or the token ids) goes
to stdout and a summary to stderr, or everything as one JSON object with ``--json``.

Steps of ``run_generate``: check the options, load the model, apply the routing, make
the prompt's ids, generate under a ``GenerationMonitor``, print.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import flexmoe.hf
from flexmoe.cli.generate_monitor import GenerationMonitor, GenerationSummary, LiveLine
from flexmoe.cli.options import CliError, float_in, int_in, one_line
from flexmoe.experts.cache import POLICIES, CacheStats
from flexmoe.hf.routing import moe_layers
from flexmoe.layer.offloaded import DEFAULT_CONFIDENCE, DEFAULT_MIN_PRECISION, offloaded_cache

__all__ = [
    "add_generate_arguments",
    "load_config",
    "load_model",
    "load_tokenizer",
    "prompt_ids",
    "run_generate",
]

T = TypeVar("T")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The files a save_pretrained tokenizer leaves (any one of them means there is one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _unit_interval(*, open_below: bool) -> Callable[[str], float]:
    """An argparse ``type=``: a number in ``(0, 1]`` (``open_below``) or ``[0, 1]``."""
    expected = "(0, 1]" if open_below else "[0, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (0 < value <= 1 if open_below else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"expected a number in {expected}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_probability = _unit_interval(open_below=True)
_fraction = _unit_interval(open_below=False)


def _per_layer(parse: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse ``type=``: one value, or comma-separated values (one per MoE layer)."""

    def parse_all(text: str) -> list[T]:
        return [parse(part) for part in text.split(",")]

    parse_all.__name__ = getattr(parse, "__name__", "value")
    return parse_all


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the generate command's options (their help says the defaults)."""
    parser.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="a save_pretrained directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", metavar="TEXT", help="the prompt, through the directory's tokenizer (default: none)"
    )
    prompt.add_argument(
        "--prompt-ids", metavar="IDS", help="the prompt as token ids, e.g. 1,2,3 (default: none)"
    )
    parser.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=int_in(1),
        default=64,
        help="tokens to generate, at most (default: 64)",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="go on past end-of-text (default: off)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: ids, text and summary (default: off)"
    )
    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--expert-budget",
        metavar="SIZE",
        default=None,
        help="leave the experts on disk and hold at most SIZE bytes of them: 8GiB, 512MiB, 2GB or a "
        "number (default: none, the whole model in memory)",
    )
    memory.add_argument(
        "--policy",
        choices=POLICIES,
        default=None,
        help="the expert cache's eviction, with --expert-budget (default: predictive)",
    )
    memory.add_argument(
        "--no-prefetch",
        action="store_true",
        help="read experts only when needed, with --expert-budget (default: off)",
    )
    memory.add_argument(
        "--prefetch-confidence",
        metavar="X",
        type=float_in(0),
        default=None,
        help="read a predicted expert ahead only if its router gives it at least X times the uniform "
        f"probability, with --expert-budget (default: {DEFAULT_CONFIDENCE}; 0: every predicted one)",
    )
    memory.add_argument(
        "--prefetch-min-precision",
        metavar="P",
        type=_fraction,
        default=None,
        help="read a predicted expert ahead only if at least P of its past predictions were used, "
        f"with --expert-budget (default: {DEFAULT_MIN_PRECISION}; 0: always)",
    )
    memory.add_argument(
        "--int8-linear",
        action="store_true",
        help="hold every linear layer but a tied head (the attention's weights) as int8 with "
        "per-output-channel scales: a decoded token reads half their bytes (default: off)",
    )
    memory.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="the model's dtype (default: its config's, else fp32)",
    )
    memory.add_argument(
        "--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 (default: cpu)"
    )
    routing = parser.add_argument_group(
        "routing: experts per token; one value for every MoE layer, or one per MoE layer (2,2,1,1)"
    )
    routing.add_argument(
        "--routing-top-k",
        metavar="K",
        type=_per_layer(int_in(1)),
        default=None,
        help="K experts per token (default: the model's)",
    )
    routing.add_argument(
        "--routing-top-p",
        metavar="P",
        type=_per_layer(_probability),
        default=None,
        help="each token keeps the fewest of its top-k experts whose probabilities reach P (default: off)",
    )
    routing.add_argument(
        "--routing-min-k",
        metavar="K",
        type=int_in(1),
        default=None,
        help="at least K experts under top-p (default: 1)",
    )
    sampling = parser.add_argument_group("sampling (default: greedy)")
    sampling.add_argument("--sample", action="store_true", help="sample the next token (default: off)")
    sampling.add_argument(
        "--temperature",
        metavar="T",
        type=float_in(positive=True),
        default=None,
        help="the sampling temperature (default: 1.0)",
    )
    sampling.add_argument(
        "--sampling-top-p",
        metavar="P",
        type=_probability,
        default=None,
        help="nucleus sampling (default: 1.0, off)",
    )
    sampling.add_argument(
        "--sampling-top-k",
        metavar="K",
        type=int_in(0),
        default=None,
        help="sample among the K likeliest tokens (default: 0, off)",
    )
    sampling.add_argument(
        "--seed", metavar="N", type=int_in(0), default=0, help="the sampling seed (default: 0)"
    )


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that need another one."""
    if args.expert_budget is None:
        offload_only = (
            (args.policy is not None, "--policy"),
            (args.no_prefetch, "--no-prefetch"),
            (args.prefetch_confidence is not None, "--prefetch-confidence"),
            (args.prefetch_min_precision is not None, "--prefetch-min-precision"),
        )
        for given, flag in offload_only:
            if given:
                raise CliError(f"argument {flag}: needs --expert-budget (the model is otherwise in memory)")
    if not args.sample:
        for value, flag in (
            (args.temperature, "--temperature"),
            (args.sampling_top_p, "--sampling-top-p"),
            (args.sampling_top_k, "--sampling-top-k"),
        ):
            if value is not None:
                raise CliError(f"argument {flag}: needs --sample (decoding is otherwise greedy)")
    if args.routing_min_k is not None and args.routing_top_p is None:
        raise CliError("argument --routing-min-k: needs --routing-top-p (it bounds top-p routing)")


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise CliError(f"argument --device: {one_line(error)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"argument --device: {text} asked for, but CUDA is not available here")
    return device


def load_config(directory: Path, transformers: Any) -> Any:
    """The ``transformers`` config of ``MODEL_DIR``."""
    if not (directory / "config.json").is_file():
        raise CliError(f"argument MODEL_DIR: {directory} is not a model directory (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(directory)
    except (ValueError, OSError) as error:
        raise CliError(f"argument MODEL_DIR: {one_line(error)}") from None


def load_model(args: argparse.Namespace, transformers: Any) -> Any:
    """The ``transformers`` causal LM of ``MODEL_DIR``: offloaded with ``--expert-budget``, else converted."""
    directory: Path = args.model_dir
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.expert_budget is not None:
        try:
            budget = flexmoe.hf.parse_bytes(args.expert_budget)
        except ValueError as error:
            raise CliError(f"argument --expert-budget: {one_line(error)}") from None
        confidence = DEFAULT_CONFIDENCE if args.prefetch_confidence is None else args.prefetch_confidence
        min_precision = args.prefetch_min_precision
        min_precision = DEFAULT_MIN_PRECISION if min_precision is None else min_precision
        try:
            return flexmoe.hf.load_offloaded(
                directory,
                expert_budget=budget,
                dtype=dtype,
                device=device,
                policy=args.policy or "predictive",
                prefetch=not args.no_prefetch,
                prefetch_confidence=confidence,
                prefetch_min_precision=min_precision,
                int8_linear=args.int8_linear,
            )
        except ValueError as error:
            flag = "--expert-budget" if "expert_budget" in str(error) else "MODEL_DIR"
            raise CliError(f"argument {flag}: {one_line(error)}") from None
        except (FileNotFoundError, OSError) as error:
            raise CliError(f"argument MODEL_DIR: {one_line(error)}") from None
    try:
        if dtype is None:
            config = transformers.AutoConfig.from_pretrained(directory)
            dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        flexmoe.hf.convert(model)
        if args.int8_linear:
            flexmoe.hf.quantize_linear_layers(model)
    except (ValueError, OSError, flexmoe.hf.UnsupportedMoEError) as error:
        raise CliError(f"argument MODEL_DIR: {one_line(error)}") from None
    return model


def load_tokenizer(directory: Path, transformers: Any) -> Any:
    """The directory's tokenizer, or ``None`` when it has none."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as error:
        raise CliError(f"argument MODEL_DIR: cannot load its tokenizer: {one_line(error)}") from None


def prompt_ids(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> list[int]:
    """The prompt's token ids: ``--prompt`` through the tokenizer, or ``--prompt-ids`` checked."""
    if args.prompt is not None:
        if tokenizer is None:
            raise CliError(
                f"argument --prompt: {args.model_dir} has no tokenizer; give the prompt as --prompt-ids 1,2,3"
            )
        ids = [int(i) for i in tokenizer(args.prompt)["input_ids"]]
        if not ids:
            raise CliError("argument --prompt: the tokenizer made no token of it")
        return ids
    try:
        ids = [int(part) for part in args.prompt_ids.split(",")]
    except ValueError:
        raise CliError(
            f"argument --prompt-ids: expected comma-separated token ids like 1,2,3, got {args.prompt_ids!r}"
        ) from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CliError(
            f"argument --prompt-ids: ids must be in [0, {vocab_size - 1}] (the vocabulary), got {bad}"
        )
    return ids


def _apply_routing(args: argparse.Namespace, model: nn.Module) -> None:
    """``--routing-top-k/-top-p/-min-k`` through ``flexmoe.hf.set_routing``, layer by layer where listed."""
    count = len(moe_layers(model))
    per_layer: dict[str, list[Any]] = {}
    for name, values in (("top_k", args.routing_top_k), ("top_p", args.routing_top_p)):
        if values is None:
            continue
        if len(values) not in (1, count):
            raise CliError(
                f"argument --routing-{name.replace('_', '-')}: give one value or one per MoE layer "
                f"(the model has {count}), got {len(values)}"
            )
        per_layer[name] = values * count if len(values) == 1 else values
    if not per_layer:
        return
    common = {} if args.routing_min_k is None else {"min_k": args.routing_min_k}
    try:
        for layer in range(count):
            changes = {name: values[layer] for name, values in per_layer.items()}
            flexmoe.hf.set_routing(model, **changes, **common, layers=[layer])
    except ValueError as error:
        message = str(error)
        flag = next(
            (f"--routing-{name.replace('_', '-')}" for name in ("min_k", "top_p") if name in message),
            "--routing-top-k",
        )
        raise CliError(f"argument {flag}: {one_line(error)}") from None


def _check_length(config: Any, prompt: int, new: int) -> None:
    """Refuse a generation longer than the model's positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt + new > limit:
        raise CliError(
            f"argument --max-new-tokens: the prompt's {prompt} tokens and {new} new ones exceed the model's "
            f"max_position_embeddings={limit}"
        )


def _status(monitor: GenerationMonitor, total: int) -> str:
    """The live line: tokens, tokens/s, and the cache's hit rate and bytes read."""
    rate = monitor.decode_tokens_per_s()
    parts = [f"{monitor.new_tokens}/{total} tokens", f"{rate:.1f} tok/s" if rate else "prefill done"]
    cache = monitor.cache_so_far()
    if cache is not None:
        parts += [f"hit rate {cache.hit_rate:.0%}", f"read {_size(cache.bytes_read)}"]
    return "  ".join(parts)


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _generate(
    args: argparse.Namespace, model: Any, ids: list[int], transformers: Any
) -> tuple[Tensor, GenerationSummary]:
    """Generate under a monitor (and the live line); the new ids and the summary."""
    cache = offloaded_cache(model)

    def cache_stats() -> CacheStats | None:
        return None if cache is None else cache.stats

    line = LiveLine(sys.stderr)
    monitor = GenerationMonitor(
        [layer for _, layer in moe_layers(model)],
        cache_stats,
        on_step=(lambda m: line.show(_status(m, args.max_new_tokens))) if line.enabled else None,
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
    if args.sample:
        options |= {
            "temperature": 1.0 if args.temperature is None else args.temperature,
            "top_p": 1.0 if args.sampling_top_p is None else args.sampling_top_p,
            "top_k": args.sampling_top_k or 0,
        }
        torch.manual_seed(args.seed)
    if args.ignore_eos:
        options["min_new_tokens"] = args.max_new_tokens
    try:
        monitor.start()
        with torch.no_grad():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                logits_processor=transformers.LogitsProcessorList([monitor]),
                **options,
            )
    finally:
        line.close()
    new_ids = output[0, len(ids) :].cpu()
    return new_ids, monitor.summary(len(ids), len(new_ids))


def _layer_values(values: list[str]) -> str:
    """One value when every MoE layer has it, else the values in layer order (``2,2,1``)."""
    return values[0] if len(set(values)) == 1 else ",".join(values)


def _print_summary(summary: GenerationSummary, routing: list[flexmoe.hf.LayerRouting]) -> None:
    """The summary, a few lines on stderr."""
    out = sys.stderr
    decode = summary.decode_tokens_per_s
    print(
        f"prompt {summary.prompt_tokens} tokens: prefill {summary.prefill_s:.3f} s "
        f"({summary.prefill_tokens_per_s:.1f} tok/s); {summary.new_tokens} new tokens: decode "
        + (f"{decode:.2f} tok/s" if decode is not None else "n/a (one token)"),
        file=out,
    )
    top_k = _layer_values([str(r.top_k) for r in routing])
    top_p = _layer_values(["off" if r.top_p is None else str(r.top_p) for r in routing])
    mean = summary.decode_experts_per_token or summary.prefill_experts_per_token
    print(
        f"routing: top-k {top_k}, top-p {top_p}; {mean:.2f} experts per token and layer",
        file=out,
    )
    stats = summary.cache
    if stats is not None:
        per_token = summary.decode_bytes_read_per_token
        print(
            f"expert cache: hit rate {stats.hit_rate:.1%} ({stats.hits} of {stats.lookups}), "
            f"prefetch precision {stats.prefetch_precision:.1%} recall {stats.prefetch_recall:.1%}; "
            f"read {_size(stats.bytes_read)} (prefill {_size(summary.prefill_bytes_read or 0)}"
            + (f", {_size(per_token)} per decoded token" if per_token is not None else "")
            + f"); resident {_size(stats.resident_bytes)}, peak {_size(stats.peak_resident_bytes)}"
            + (f" of {_size(stats.budget_bytes)}" if stats.budget_bytes is not None else ""),
            file=out,
        )
    print(f"peak memory (RSS) {_size(summary.peak_rss_bytes)}", file=out)


def run_generate(args: argparse.Namespace) -> None:
    """Load, route, generate, print."""
    _check_options(args)
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise CliError("needs transformers>=5: pip install 'flexmoe[hf]'") from None
    transformers.utils.logging.disable_progress_bar()  # the weights' loading bar
    config = load_config(args.model_dir, transformers)
    tokenizer = load_tokenizer(args.model_dir, transformers)
    ids = prompt_ids(args, tokenizer, int(config.vocab_size))  # refused before the model loads
    _check_length(config, len(ids), args.max_new_tokens)
    model = load_model(args, transformers)
    _apply_routing(args, model)
    new_ids, summary = _generate(args, model, ids, transformers)
    text = None if tokenizer is None else tokenizer.decode(new_ids.tolist(), skip_special_tokens=True)
    routing = flexmoe.hf.routing_settings(model)
    if args.json:
        record = {
            "model_dir": str(args.model_dir),
            "offloaded": args.expert_budget is not None,
            "prompt_ids": ids,
            "new_ids": new_ids.tolist(),
            "text": text,
            "routing": [
                {"path": r.path, "top_k": r.top_k, "top_p": r.top_p, "min_k": r.min_k} for r in routing
            ],
            **summary.to_json(),
        }
        print(json.dumps(record))
        return
    if text is not None:
        print(tokenizer.decode(ids, skip_special_tokens=True) + text, flush=True)
    else:
        print(",".join(map(str, new_ids.tolist())), flush=True)
    _print_summary(summary, routing)
