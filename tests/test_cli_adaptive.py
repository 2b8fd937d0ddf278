"""`flexmoe train`'s adaptive routing: zero-computation experts, layer schedules and the mean-k
controller in the main job; per-layer experts per token, skip rate and top-p in metrics.jsonl and
the report; an exact resume of schedules and the controller; one-line errors."""

import json
from pathlib import Path

import pytest

from flexmoe.cli import main
from flexmoe.cli.report import read_run, summary_rows

from .cli_helpers import refusal

TINY = ["--dim", "16", "--layers", "2", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress", "--log-every", "2", "--eval-batches", "1"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _per_step(run: Path, name: str) -> dict[int, list]:
    """``{step: [layer 0's value, layer 1's value]}`` of a per-step layer column."""
    out = {}
    for record in _records(run):
        columns = record.get("per_step")
        if columns:
            for j, step in enumerate(columns["step"]):
                out[step] = [layer[name][j] for layer in columns["layers"]]
    return out


def test_a_layer_schedule_and_zero_experts_in_the_main_job(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--top-k", "2", "--layer-top-k", "2->1@4,2", "--zero-experts", "skip,copy"]
    main(["train", *TINY, *flags, "--steps", "6", "--run-dir", str(run)])
    top_k = {r["step"]: [layer["top_k"] for layer in r["layers"]] for r in _records(run) if "layers" in r}
    assert top_k == {2: [2, 2], 4: [1, 2], 6: [1, 2]}  # layer 0: top-1 from step 4
    k = _per_step(run, "experts_per_token")
    assert sorted(k) == list(range(1, 7))
    assert all(v[0] <= 1 for s, v in k.items() if s >= 4)  # zero experts: at most one routed expert
    skip = _per_step(run, "skip_rate")
    assert all(0 <= v <= 1 for row in skip.values() for v in row) and any(
        v > 0 for row in skip.values() for v in row
    )
    for record in (r for r in _records(run) if "layers" in r):
        for layer in record["layers"]:
            hist = layer["experts_per_token_hist"]
            assert sum(hist) == 2 * 16  # every token of the step
            assert sum(i * c for i, c in enumerate(hist)) == layer["assignments"]  # the routed experts
    capsys.readouterr()
    main(["report", str(run)])
    page = (run / "report.html").read_text()
    assert "experts_per_token.png" in page and "experts_per_token_hist.png" in page
    assert "skip rate" in dict(summary_rows(read_run(run)))["experts per token"]


def test_the_controller_moves_top_p_toward_the_target(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--top-k", "4", "--top-p", "0.95", "--target-experts", "1.5", "--target-rate", "0.1"]
    main(["train", *TINY, *flags, "--steps", "8", "--run-dir", str(run)])
    p = _per_step(run, "top_p")
    k = _per_step(run, "experts_per_token")
    assert p[1] == [0.95, 0.95]  # step 1 runs with the starting p
    for step in range(2, 9):  # then each step's p is the rule applied to the step before
        for i in range(2):
            expected = min(1.0, max(0.05, p[step - 1][i] + 0.1 * (1.5 - k[step - 1][i])))
            assert p[step][i] == pytest.approx(expected)
    assert all(p[8][i] < 0.95 for i in range(2))  # top-4 at p=0.95 takes more than 1.5: p went down


def test_schedules_and_the_controller_resume_exactly(tmp_path, capsys):
    flags = ["--top-k", "4", "--top-p", "0.9", "--target-experts", "2", "--target-rate", "0.1"]
    flags += ["--layer-capacity-factor", "0->1.5@3", "--layer-top-k", "4->3@0..6"]
    common = [*TINY, *flags, "--steps", "6"]
    main(["train", *common, "--run-dir", str(tmp_path / "straight"), "--checkpoint-every", "3"])
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000003"
    main(["train", *common, "--run-dir", str(tmp_path / "resumed"), "--resume", str(checkpoint)])
    for name in ("top_p", "experts_per_token"):
        straight, resumed = _per_step(tmp_path / "straight", name), _per_step(tmp_path / "resumed", name)
        assert sorted(resumed) == [4, 5, 6]
        assert {s: straight[s] for s in resumed} == resumed, name
    losses = {r["step"]: r["loss"] for r in _records(tmp_path / "straight") if "loss" in r}
    assert {r["step"]: r["loss"] for r in _records(tmp_path / "resumed") if "loss" in r} == {
        s: losses[s] for s in (4, 6)
    }


@pytest.mark.parametrize("top_k", ["2,1", "2->1@3"])
def test_a_top_k_schedule_resumes_from_a_checkpoint_of_another_top_k(tmp_path, capsys, top_k):
    # The checkpoint records each layer's top_k: the resumed model takes the checkpoint step's.
    common = [*TINY, "--top-k", "2", "--layer-top-k", top_k, "--steps", "5"]
    main(["train", *common, "--run-dir", str(tmp_path / "straight"), "--checkpoint-every", "3"])
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000003"
    main(["train", *common, "--run-dir", str(tmp_path / "resumed"), "--resume", str(checkpoint)])
    straight = _per_step(tmp_path / "straight", "experts_per_token")
    resumed = _per_step(tmp_path / "resumed", "experts_per_token")
    expected = [2.0, 1.0] if top_k == "2,1" else [1.0, 1.0]  # every layer top-1 from step 3
    assert resumed == {4: expected, 5: expected} == {s: straight[s] for s in resumed}


def test_adaptive_options_come_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text('layer-top-k = "2->1@2"\nzero_experts = "skip"\ntop-k = 2\n')
    run = tmp_path / "run"
    main(["train", *TINY, "--config", str(config), "--steps", "3", "--run-dir", str(run)])
    settings = json.loads((run / "config.json").read_text())
    assert (settings["layer_top_k"], settings["zero_experts"]) == ("2->1@2", "skip")
    assert [layer["top_k"] for layer in _records(run)[-2]["layers"]] == [1, 1]  # step 3: top-1
    config.write_text("layer-top-k = [2, 1]\n")
    assert refusal(["train", *TINY, "--config", str(config), "--run-dir", str(run)], capsys) == (
        f"flexmoe train: error: --config {config}: layer-top-k: must be non-empty text, got [2, 1]"
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--zero-experts", "skip,nothing"],
            "argument --zero-experts: must be a comma-separated list of skip, copy, constant, "
            "got 'skip,nothing'",
        ),
        (
            ["--layer-top-k", "2,1,1"],
            "argument --layer-top-k: expected 1 entry (every layer) or 2 (one per MoE layer), "
            "got 3 in '2,1,1'",
        ),
        (
            ["--layer-top-k", "2,x"],
            "argument --layer-top-k: cannot read 'x'; expected a number, 'A->B@STEP' or 'A->B@START..END'",
        ),
        (
            ["--layer-top-k", "5,1"],
            "argument --layer-top-k: every value must be in [--min-k, --experts] = [1, 4], got '5,1'",
        ),
        (
            ["--layer-top-p", "0.5->2@3"],
            "argument --layer-top-p: every value must be in (0, 1], got 0.5->2@3",
        ),
        (
            ["--target-experts", "1.5"],
            "argument --target-experts: needs --top-p (the controller's starting p)",
        ),
        (
            ["--top-p", "0.5", "--target-experts", "3"],
            "argument --target-experts: must be in [--min-k, --top-k] = [1, 2], got 3.0",
        ),
        (
            ["--top-p", "0.5", "--target-experts", "1.5", "--target-rate", "0"],
            "argument --target-rate: must be a finite number > 0, got 0.0",
        ),
    ],
)
def test_bad_adaptive_options_are_one_line(tmp_path, capsys, flags, line):
    assert refusal(["train", *TINY, "--steps", "1", "--run-dir", str(tmp_path / "r"), *flags], capsys) == (
        f"flexmoe train: error: {line}"
    )
