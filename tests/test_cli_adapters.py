"""``flexmoe train --lora-rank``: fine-tune expert adapters of a trained run or a transformers checkpoint.

A short run changes only the adapters (every base tensor equals the base's), the saved
adapter reloads onto a fresh base with the same logits, and a ``transformers`` run's
PEFT files load in PEFT with the same logits; bad option combinations are one-line
refusals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import flexmoe.hf
from flexmoe.adapters import load_esft_adapter, load_peft_adapter
from flexmoe.checkpoint.files import safetensors_torch
from flexmoe.cli import main
from flexmoe.cli.train_adapters import AdapterOptions, finetune, load_adapter_dir, main_job_model
from flexmoe.cli.train_config import TrainConfig

from .cli_helpers import refusal
from .hf_tiny import tiny_model

SMALL = ["--batch-size", "4", "--context", "32", "--dim", "32", "--no-progress"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("base") / "run"
    main(["train", "--steps", "4", "--log-every", "2", *SMALL, "--run-dir", str(run)])
    return run


def test_lora_finetune_changes_only_the_adapter_and_reloads(base_run, tmp_path, capsys):
    out = tmp_path / "ft"
    config = TrainConfig(steps=5, batch_size=4, context=32, lr=1e-2, log_every=5, eval_batches=2, run_dir=out)
    options = AdapterOptions(rank=4, alpha=8, experts=(0, 2, 5), init_from=base_run)
    model, summary = finetune(config, options)
    base = main_job_model(base_run)
    trained = model.state_dict()
    for name, value in base.state_dict().items():  # the base is untouched
        assert torch.equal(trained[name], value), name
    lora = {name: value for name, value in trained.items() if ".lora." in name}
    assert lora and all(value.shape[0] == 3 for name, value in lora.items() if ".B_" in name)
    assert any(value.abs().sum() > 0 for name, value in lora.items() if ".B_" in name)  # trained
    assert summary["trainable_parameters"] == sum(v.numel() for n, v in lora.items() if "expert_ids" not in n)
    tokens = torch.randint(0, 256, (2, 16))
    model.eval()
    with torch.no_grad():
        want, before = model(tokens), base(tokens)
    assert not torch.allclose(want, before)
    loaded = load_adapter_dir(base, out / "adapter")  # the same base, the saved adapter
    assert loaded == options
    with torch.no_grad():
        torch.testing.assert_close(base(tokens), want)
    assert json.loads((out / "summary.json").read_text())["adapter"] == str(out / "adapter")


def test_cli_lora_run_on_the_main_job(base_run, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["train", "--steps", "3", "--log-every", "1", "--eval-batches", "1", *SMALL, "--run-dir", str(out)]
    main([*argv, "--lora-rank", "2", "--lora-targets", "w_out", "--init-from", str(base_run)])
    printed = capsys.readouterr().out
    assert "fine-tuning lora adapters" in printed and "step     3  loss" in printed
    settings = json.loads((out / "adapter" / "adapter.json").read_text())
    assert settings["rank"] == 2 and settings["targets"] == ["w_out"] and settings["experts"] is None
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["steps"] == 3 and recorded["adapter"] == settings


def test_cli_lora_run_on_a_transformers_checkpoint_writes_peft_files(tmp_path, capsys):
    hf_dir, out = tmp_path / "hf", tmp_path / "ft"
    tiny_model("qwen3_moe").save_pretrained(hf_dir)
    argv = ["train", "--steps", "3", "--eval-batches", "1", "--lr", "0.02", *SMALL, "--run-dir", str(out)]
    main([*argv, "--lora-rank", "4", "--lora-alpha", "8", "--hf-model", str(hf_dir)])
    ids = torch.randint(0, 101, (1, 12))
    converted = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    flexmoe.hf.convert(converted)
    load_adapter_dir(converted, out / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = converted(ids).logits
        assert not torch.allclose(plain(ids).logits, want)
        peft_model = PeftModel.from_pretrained(plain, out / "adapter-peft")
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-4, atol=1e-4)
        again = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        flexmoe.hf.convert(again)
        load_peft_adapter(again, out / "adapter-peft")
        torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_adapter_options_are_checked(tmp_path, capsys):
    assert "needs an adapter to fine-tune" in refusal(["train", "--init-from", str(tmp_path)], capsys)
    assert "exactly one base" in refusal(["train", "--lora-rank", "4"], capsys)
    assert "--lora-rank: must be an int >= 1" in refusal(
        ["train", "--lora-rank", "0", "--init-from", str(tmp_path)], capsys
    )
    bad_ids = ["train", "--lora-rank", "2", "--lora-experts", "1,x", "--init-from", str(tmp_path)]
    assert "comma-separated expert ids" in refusal(bad_ids, capsys)
    missing = ["train", "--lora-rank", "2", "--init-from", str(tmp_path / "no")]
    assert "--init-from" in refusal(missing, capsys)
    esft_workers = ["train", "--workers", "2", "--esft", "0.3", "--init-from", str(tmp_path)]
    assert "--workers: ESFT fine-tuning runs on one worker" in refusal(esft_workers, capsys)


def _logged_losses(out: str) -> list[float]:
    return [float(loss) for loss in re.findall(r"step +\d+  loss ([0-9.]+)", out)]


@pytest.fixture(scope="module")
def one_expert_run(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("base1") / "run"
    main(["train", "--steps", "2", "--experts", "1", "--top-k", "1", *SMALL, "--run-dir", str(run)])
    return run


@pytest.mark.parametrize(
    ("base", "experts"),
    [("base_run", "0,3,5"), ("one_expert_run", "0")],  # 8 experts, 4 per worker; 1 sharded over 2
)
def test_lora_finetune_on_two_workers_trains_the_one_worker_adapter(base, experts, request, tmp_path, capsys):
    """The same global batch on 2 workers (4 windows each) as on 1 (8): the same losses and adapter."""
    base_run = request.getfixturevalue(base)
    capsys.readouterr()  # the base run's own output, when it runs now
    common = ["--steps", "3", "--log-every", "1", "--context", "32", "--eval-batches", "2", "--no-progress"]
    lora = ["--lr", "0.01", "--lora-rank", "2", "--lora-experts", experts, "--init-from", str(base_run)]
    one, two = tmp_path / "one", tmp_path / "two"
    main(["train", "--batch-size", "8", *common, *lora, "--run-dir", str(one)])
    alone = capsys.readouterr().out
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexmoe.cli",
            "train",
            "--workers",
            "2",
            "--batch-size",
            "4",
            *common,
            *lora,
            "--run-dir",
            str(two),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    size = re.findall(r"adapters \((\d+) parameters, base frozen\)", alone)
    assert f"adapters ({size[0]} parameters, base frozen) on 2 workers" in result.stdout, result.stdout
    assert len(_logged_losses(alone)) == 3
    assert _logged_losses(result.stdout) == pytest.approx(_logged_losses(alone), abs=2e-3)
    read = safetensors_torch().load_file
    want, got = (
        read(str(one / "adapter" / "adapter.safetensors")),
        read(str(two / "adapter" / "adapter.safetensors")),
    )
    assert got.keys() == want.keys()
    for key in want:  # AdamW's first steps turn rounding-sized gradients into lr-sized updates: atol
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-3, atol=1e-3, msg=lambda m, k=key: f"{k}: {m}"
        )
    tokens = torch.randint(0, 256, (2, 16))
    logits = []
    for run in (one, two):  # each saved adapter loads on one device
        model = main_job_model(base_run).eval()
        load_adapter_dir(model, run / "adapter")
        with torch.no_grad():
            logits.append(model(tokens))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)
    assert json.loads((two / "summary.json").read_text())["workers"] == 2


def test_esft_finetune_trains_only_the_chosen_experts_and_reloads(base_run, tmp_path):
    out = tmp_path / "esft"
    main(
        [
            "train",
            "--steps",
            "4",
            *SMALL,
            "--lr",
            "1e-2",
            "--esft",
            "0.3",
            "--init-from",
            str(base_run),
            "--run-dir",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    chosen = summary["esft_experts"]
    assert chosen and all(0 < len(ids) < 8 for ids in chosen.values())  # a few of the 8 experts per layer
    adapter = load_esft_adapter(out / "adapter")
    assert {path: list(e.expert_ids) for path, e in adapter.layers.items()} == chosen
    base, tuned = main_job_model(base_run), main_job_model(base_run)
    options = load_adapter_dir(tuned, out / "adapter")
    assert options.method == "esft" and options.esft_threshold == 0.3
    changed = set()
    for (name, before), after in zip(base.state_dict().items(), tuned.state_dict().values(), strict=True):
        if not torch.equal(before, after):
            changed.add(name)
            assert name.endswith(("experts.w_in", "experts.w_out")), name  # nothing but experts
    assert changed
    for path, experts in adapter.layers.items():  # and of those, only the chosen rows
        w_in = dict(tuned.named_parameters())[f"{path}.w_in"]
        w_in_base = dict(base.named_parameters())[f"{path}.w_in"]
        others = [e for e in range(w_in.shape[0]) if e not in experts.expert_ids]
        assert torch.equal(w_in[others], w_in_base[others])


def test_lora_and_esft_together_are_refused(base_run, capsys):
    line = refusal(["train", "--lora-rank", "4", "--esft", "0.3", "--init-from", str(base_run)], capsys)
    assert "choose one adapter" in line
    line = refusal(["train", "--esft", "1.5", "--init-from", str(base_run)], capsys)
    assert "--esft: must be in (0, 1], got 1.5" in line


def test_lora_finetune_of_a_transformers_checkpoint_on_two_workers(tmp_path, capsys):
    """A --hf-model base on 2 workers (experts split, 4 windows each) trains what 1 worker (8) does."""
    hf_dir, one, two = tmp_path / "hf", tmp_path / "one", tmp_path / "two"
    tiny_model("qwen3_moe").save_pretrained(hf_dir)
    common = ["--steps", "3", "--log-every", "1", "--context", "32", "--eval-batches", "2", "--no-progress"]
    lora = ["--lr", "0.01", "--lora-rank", "2", "--hf-model", str(hf_dir)]
    main(["train", "--batch-size", "8", *common, *lora, "--run-dir", str(one)])
    alone = capsys.readouterr().out
    command = [sys.executable, "-m", "flexmoe.cli", "train", "--workers", "2", "--batch-size", "4"]
    result = subprocess.run(
        [*command, *common, *lora, "--run-dir", str(two)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 2 workers" in result.stdout, result.stdout
    assert len(_logged_losses(alone)) == 3
    assert _logged_losses(result.stdout) == pytest.approx(_logged_losses(alone), abs=2e-3)
    read = safetensors_torch().load_file
    for folder, name in (("adapter", "adapter.safetensors"), ("adapter-peft", "adapter_model.safetensors")):
        want, got = read(str(one / folder / name)), read(str(two / folder / name))
        assert got.keys() == want.keys()
        for key in want:  # AdamW's first steps turn rounding-sized gradients into lr-sized updates
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-3, atol=1e-3, msg=lambda m, k=key: f"{k}: {m}"
            )
    assert json.loads((two / "adapter-peft" / "adapter_config.json").read_text()) == json.loads(
        (one / "adapter-peft" / "adapter_config.json").read_text()
    )
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():  # the two workers' PEFT files load in PEFT as the one worker's do
        logits = [
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(hf_dir).eval(), run / "adapter-peft"
            )(ids).logits
            for run in (one, two)
        ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-3, atol=1e-3)
