"""`flexmoe generate`: the in-memory model's tokens, offloaded or not; the summary; one-line refusals."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import flexmoe.hf
from flexmoe.cli import main
from flexmoe.cli.generate_monitor import LiveLine
from tests.cli_helpers import refusal
from tests.hf_tiny import VOCAB, tiny_model

PROMPT = [5, 17, 42, 8, 99, 3]
WORDS = ["[UNK]", "def", "main", "(", ")", ":", "return", "x", "+", "1", "print", "hello", "world"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE (8 experts, top-3, 2 layers, 64 positions) with no tokenizer."""
    directory = tmp_path_factory.mktemp("qwen3_moe")
    tiny_model("qwen3_moe").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, model_dir):
    """The same model with a word-level tokenizer of a few words (built here, no download)."""
    directory = tmp_path_factory.mktemp("with_tokenizer")
    for path in model_dir.iterdir():
        shutil.copy(path, directory / path.name)
    words = Tokenizer(WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(directory)
    return directory


def expert_bytes() -> int:
    """One expert of the tiny Qwen3-MoE in fp32: gate, up and down, 24 x 32 each."""
    return 3 * 24 * 32 * 4


def in_memory(directory, dtype=torch.float32, **routing):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    flexmoe.hf.convert(model)
    if routing:
        flexmoe.hf.set_routing(model, **routing)
    return model


def reference_ids(model, ids: list[int], tokens: int, **options) -> list[int]:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=tokens, attention_mask=torch.ones_like(input_ids), **options
        )
    return out[0, len(ids) :].tolist()


def run_json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    return json.loads(out)


def ids_argument(ids: list[int]) -> str:
    return ",".join(map(str, ids))


@pytest.mark.parametrize("budget", [None, 4], ids=["in-memory", "offloaded"])
def test_greedy_tokens_equal_the_in_memory_models_and_the_summary_adds_up(model_dir, budget, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "12"]
    if budget is not None:
        argv += ["--expert-budget", str(budget * expert_bytes())]
    record = run_json(argv, capsys)
    expected = reference_ids(in_memory(model_dir), PROMPT, 12, do_sample=False)
    assert record["new_ids"] == expected and record["prompt_ids"] == PROMPT
    assert record["text"] is None and record["offloaded"] is (budget is not None)
    assert (record["prompt_tokens"], record["new_tokens"]) == (len(PROMPT), 12)
    assert record["prefill_s"] > 0 and record["decode_s"] > 0 and record["decode_tokens_per_s"] > 0
    assert record["decode_tokens_per_s"] == pytest.approx(11 / record["decode_s"])
    assert record["prefill_experts_per_token"] == record["decode_experts_per_token"] == 3.0
    assert [r["top_k"] for r in record["routing"]] == [3, 3]
    assert record["peak_rss_bytes"] > 0
    cache = record["cache"]
    if budget is None:
        assert cache is None
        return
    assert cache["lookups"] > 0 and cache["hits"] + cache["misses"] == cache["lookups"]
    assert cache["bytes_read"] == cache["reads"] * expert_bytes() > 0
    assert cache["hit_rate"] == pytest.approx(cache["hits"] / cache["lookups"])
    assert cache["peak_resident_bytes"] <= cache["budget_bytes"] == budget * expert_bytes()
    assert 0 < cache["prefill_bytes_read"] <= cache["bytes_read"]
    per_token = (cache["bytes_read"] - cache["prefill_bytes_read"]) / 11
    assert cache["decode_bytes_read_per_token"] == pytest.approx(per_token)
    assert 0 <= cache["prefetch_precision"] <= 1 and 0 <= cache["prefetch_recall"] <= 1
    assert cache["predicted"] > 0


def test_prefetch_thresholds_decide_what_is_read_ahead(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "6"]
    argv += ["--expert-budget", str(4 * expert_bytes())]
    expected = reference_ids(in_memory(model_dir), PROMPT, 6, do_sample=False)
    every = run_json([*argv, "--prefetch-confidence", "0", "--prefetch-min-precision", "0"], capsys)
    none = run_json([*argv, "--prefetch-confidence", "1e9"], capsys)
    assert every["new_ids"] == none["new_ids"] == expected
    assert every["cache"]["prefetch_reads"] > 0 and none["cache"]["prefetch_reads"] == 0


def test_the_plain_output_is_the_ids_then_a_summary_on_stderr(model_dir, capsys):
    budget = str(4 * expert_bytes())
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "5"]
    assert main([*argv, "--expert-budget", budget, "--policy", "lru", "--no-prefetch"]) == 0
    captured = capsys.readouterr()
    expected = reference_ids(in_memory(model_dir), PROMPT, 5, do_sample=False)
    assert captured.out == ids_argument(expected) + "\n"
    assert "prefill" in captured.err and "tok/s" in captured.err
    assert "expert cache: hit rate" in captured.err and "prefetch precision" in captured.err
    assert "peak memory (RSS)" in captured.err


@pytest.mark.parametrize(
    ("options", "routing"),
    [(["--routing-top-k", "1"], {"top_k": 1}), (["--routing-top-p", "0.3"], {"top_p": 0.3})],
)
def test_routing_options_generate_what_set_routing_does_in_memory(model_dir, options, routing, capsys):
    budget = str(4 * expert_bytes())
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "8"]
    record = run_json([*argv, *options, "--expert-budget", budget], capsys)
    reference = in_memory(model_dir, **routing)
    assert record["new_ids"] == reference_ids(reference, PROMPT, 8, do_sample=False)
    assert record["routing"] == [
        {"path": r.path, "top_k": r.top_k, "top_p": r.top_p, "min_k": r.min_k}
        for r in flexmoe.hf.routing_settings(reference)
    ]
    with torch.no_grad():
        reference(torch.tensor([PROMPT]))  # the prefill: each layer's experts per prompt token
    layers = [layer for _, layer in flexmoe.hf.routing.moe_layers(reference)]
    prefill = sum(layer.stats.mean_experts_per_token for layer in layers) / len(layers)
    assert record["prefill_experts_per_token"] == pytest.approx(prefill)
    if "top_k" in routing:
        assert record["decode_experts_per_token"] == 1.0
    else:
        assert 1.0 < prefill < 3.0 and 1.0 <= record["decode_experts_per_token"] <= 3.0


def test_routing_values_per_layer_set_each_layer(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "8"]
    record = run_json([*argv, "--routing-top-k", "3,1", "--expert-budget", "1MiB"], capsys)
    reference = in_memory(model_dir)
    flexmoe.hf.set_routing(reference, top_k=1, layers=[1])
    assert record["new_ids"] == reference_ids(reference, PROMPT, 8, do_sample=False)
    assert [r["top_k"] for r in record["routing"]] == [3, 1]
    assert record["decode_experts_per_token"] == 2.0
    assert main([*argv, "--routing-top-k", "3,1", "--routing-top-p", "0.5"]) == 0
    assert "routing: top-k 3,1, top-p 0.5;" in capsys.readouterr().err


def test_bf16_offloaded_equals_the_bf16_in_memory_model(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "8"]
    record = run_json([*argv, "--dtype", "bf16", "--expert-budget", "1MiB"], capsys)
    reference = in_memory(model_dir, dtype=torch.bfloat16)
    assert record["new_ids"] == reference_ids(reference, PROMPT, 8, do_sample=False)
    assert record["cache"]["bytes_read"] == record["cache"]["reads"] * expert_bytes() // 2


@pytest.mark.parametrize("budget", [None, "1MiB"], ids=["in-memory", "offloaded"])
def test_int8_linear_layers_generate_what_the_quantized_in_memory_model_does(model_dir, budget, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "8"]
    argv += ["--dtype", "bf16", "--int8-linear"] + ([] if budget is None else ["--expert-budget", budget])
    record = run_json(argv, capsys)
    reference = in_memory(model_dir, dtype=torch.bfloat16)
    assert flexmoe.hf.quantize_linear_layers(reference) > 0
    assert record["new_ids"] == reference_ids(reference, PROMPT, 8, do_sample=False)


def test_sampling_is_seeded_and_samples_as_transformers_does(model_dir, capsys):
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "10"]
    options = ["--sample", "--temperature", "1.5", "--sampling-top-p", "0.9", "--seed", "7"]
    first = run_json([*argv, *options], capsys)["new_ids"]
    assert run_json([*argv, *options, "--expert-budget", "1MiB"], capsys)["new_ids"] == first
    torch.manual_seed(7)
    sampling = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 0}
    assert reference_ids(in_memory(model_dir), PROMPT, 10, **sampling) == first
    greedy = run_json(argv, capsys)["new_ids"]
    assert first != greedy  # a seed of this model that samples off the greedy path


def test_a_prompt_goes_through_the_directorys_tokenizer(tokenizer_dir, capsys):
    prompt = "def main ( ) :"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(prompt)["input_ids"]
    argv = ["generate", str(tokenizer_dir), "--prompt", prompt, "--max-new-tokens", "6"]
    record = run_json(argv, capsys)
    assert record["prompt_ids"] == ids == [1, 2, 3, 4, 5]
    assert record["new_ids"] == reference_ids(in_memory(tokenizer_dir), ids, 6, do_sample=False)
    assert record["text"] == tokenizer.decode(record["new_ids"], skip_special_tokens=True)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == tokenizer.decode(ids + record["new_ids"], skip_special_tokens=True) + "\n"
    # ids are accepted with a tokenizer too, and the text is still decoded
    by_ids = run_json(
        ["generate", str(tokenizer_dir), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6"], capsys
    )
    assert by_ids["new_ids"] == record["new_ids"] and by_ids["text"] == record["text"]


def test_ignore_eos_generates_every_token(tmp_path, capsys):
    tiny_model("olmoe", eos_token_id=7).save_pretrained(tmp_path)
    model = in_memory(tmp_path)
    argv = ["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--max-new-tokens", "20"]
    stopped = reference_ids(model, [1, 2, 3], 20, do_sample=False, eos_token_id=7)
    assert len(run_json(argv, capsys)["new_ids"]) == len(stopped)
    record = run_json([*argv, "--ignore-eos"], capsys)
    assert record["new_tokens"] == len(record["new_ids"]) == 20


def test_live_line_rewrites_one_line_and_clears_it():
    stream = io.StringIO()
    line = LiveLine(stream, enabled=True, interval=0.0)
    line.show("3/8 tokens  long status")
    line.show("4/8 tokens")
    line.close()
    assert (
        stream.getvalue() == "\r3/8 tokens  long status" + "\r4/8 tokens" + " " * 13 + "\r" + " " * 10 + "\r"
    )
    quiet = io.StringIO()
    LiveLine(quiet).show("not a terminal")  # StringIO is not a tty: nothing written
    assert quiet.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_status_line_shows_progress_and_is_cleared(model_dir, monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["generate", str(model_dir), "--prompt-ids", ids_argument(PROMPT), "--max-new-tokens", "4"]
    assert main([*argv, "--expert-budget", str(4 * expert_bytes()), "--json"]) == 0
    written = terminal.getvalue()
    first = written.split("\r")[1]
    assert re.fullmatch(r"1/4 tokens  prefill done  hit rate \d+%  read [\d.]+ KiB\s*", first), first
    assert written.endswith("\r")  # the line is cleared before the output
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 4


def test_bad_arguments_are_one_line_refusals(model_dir, tmp_path, capsys):
    base = ["generate", str(model_dir)]
    ids = ["--prompt-ids", "1,2,3", "--max-new-tokens", "4"]  # a later --max-new-tokens wins
    refusals = {
        "--prompt: .* has no tokenizer; give the prompt as --prompt-ids": [*base, "--prompt", "hello"],
        "one of the arguments --prompt --prompt-ids is required": base,
        "not allowed with argument": [*base, "--prompt", "a", *ids],
        "--prompt-ids: expected comma-separated token ids like 1,2,3, got '1,x'": [
            *base,
            "--prompt-ids",
            "1,x",
        ],
        rf"--prompt-ids: ids must be in \[0, {VOCAB - 1}\] \(the vocabulary\), got \[{VOCAB}\]": [
            *base,
            "--prompt-ids",
            f"1,{VOCAB}",
        ],
        "--policy: needs --expert-budget": [*base, *ids, "--policy", "lru"],
        "--no-prefetch: needs --expert-budget": [*base, *ids, "--no-prefetch"],
        "--prefetch-confidence: needs --expert-budget": [*base, *ids, "--prefetch-confidence", "2"],
        "--prefetch-min-precision: needs --expert-budget": [*base, *ids, "--prefetch-min-precision", "0"],
        r"--prefetch-min-precision: expected a number in \[0, 1\], got '2'": [
            *base,
            *ids,
            "--expert-budget",
            "1GiB",
            "--prefetch-min-precision",
            "2",
        ],
        "--prefetch-confidence: expected a finite number >= 0, got '-1'": [
            *base,
            *ids,
            "--expert-budget",
            "1GiB",
            "--prefetch-confidence",
            "-1",
        ],
        "--temperature: needs --sample": [*base, *ids, "--temperature", "0.7"],
        "--sampling-top-p: needs --sample": [*base, *ids, "--sampling-top-p", "0.7"],
        "--routing-min-k: needs --routing-top-p": [*base, *ids, "--routing-min-k", "2"],
        r"--routing-top-p: expected a number in \(0, 1\], got '1.5'": [*base, *ids, "--routing-top-p", "1.5"],
        r"--routing-top-k: .*top_k must be an int in \[1, num_experts=8\], got 9": [
            *base,
            *ids,
            "--routing-top-k",
            "9",
        ],
        r"--routing-top-k: give one value or one per MoE layer \(the model has 2\), got 3": [
            *base,
            *ids,
            "--routing-top-k",
            "1,2,1",
        ],
        "--routing-top-k: expected an integer >= 1, got 'x'": [*base, *ids, "--routing-top-k", "2,x"],
        "--expert-budget: .* is too small: .* top-3 experts": [*base, *ids, "--expert-budget", "5KiB"],
        "--routing-top-k: .*expert_budget of .* bytes is too small": [
            *base,
            *ids,
            "--expert-budget",
            str(3 * expert_bytes()),
            "--routing-top-k",
            "4",
        ],
        "--expert-budget: expert_budget must be a size such as '8GiB'": [
            *base,
            *ids,
            "--expert-budget",
            "lots",
        ],
        "--max-new-tokens: the prompt's 3 tokens and 62 new ones exceed .* max_position_embeddings=64": [
            *base,
            *ids,
            "--max-new-tokens",
            "62",
        ],
        "--max-new-tokens: expected an integer >= 1": [*base, *ids, "--max-new-tokens", "0"],
        "MODEL_DIR: .* is not a model directory": ["generate", str(tmp_path), *ids],
        "--device: .*": [*base, *ids, "--device", "nonsense"],
    }
    for message, argv in refusals.items():
        line = refusal(argv, capsys)
        assert line.startswith("flexmoe generate: error: "), line
        assert re.search(message, line), (message, line)
