"""The main job (`flexmoe train`) runs end to end on 1 and 2 workers, learns, checkpoints, resumes
on another worker count with the same loss, and its report renders."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexmoe.cli import main
from flexmoe.planner.trace import read_routing_trace

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "6", "--log-every", "3", "--batch-size", "4", "--context", "32", "--dim", "32"]


def test_train_learns_and_writes_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    shape = ["--batch-size", "8", "--context", "64", "--dim", "64", "--log-every", "10", "--eval-every", "20"]
    main(
        ["train", "--steps", "30", *shape, "--checkpoint-every", "20", "--run-dir", str(run), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert "step    30" in out and "step    20  eval loss" in out
    match = re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", out)
    assert match, out
    initial, final = map(float, match.groups())
    assert final < initial - 0.5  # bytes of Python source are far from uniform
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_eval_loss"] == pytest.approx(final, abs=1e-3)
    assert json.loads((run / "config.json").read_text())["experts"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [10, 20, 30]
    assert len(records[1]["layers"]) == 2 and len(records[1]["layers"][0]["routed"]) == 8
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000020", "step-000030"]

    main(["report", str(run)])
    for name in ("report.html", "loss.png", "lr.png", "grad_norm.png", "load_layer0.png", "load_layer1.png"):
        assert (run / name).stat().st_size > 1000, name
    assert not (run / "dropped.png").exists() and not (run / "plans.png").exists()  # dropless, one plan
    page = (run / "report.html").read_text()
    assert page.count("<img") == 7 and "evaluation loss" in page and "dropless" in page


def test_top_p_routing_trains_and_logs_experts_per_token(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", *SMALL, "--top-k", "3", "--top-p", "0.3", "--run-dir", str(run), "--no-progress"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    layers = [layer for r in records if "loss" in r for layer in r["layers"]]
    assert layers and all(1 <= layer["experts_per_token"] < 3 for layer in layers)
    assert all(layer["assignments"] == sum(layer["routed"]) for layer in layers)
    assert json.loads((run / "config.json").read_text())["top_p"] == 0.3


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m flexmoe.cli ARGS`` in a fresh process (workers need one); it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_adaptive_routing_on_two_workers(tmp_path):
    run = tmp_path / "run"
    adaptive = ["--top-k", "3", "--top-p", "0.3", "--target-experts", "1.5", "--zero-experts", "skip"]
    command = ["train", "--workers", "2", *SMALL, *adaptive, "--run-dir", str(run)]
    result = run_cli(*command)
    assert "2 worker(s)" in result.stdout and "done: 6 steps" in result.stdout, result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    layers = [layer for r in records if "loss" in r for layer in r["layers"]]
    assert layers and all(0 <= layer["experts_per_token"] < 3 for layer in layers)
    assert all(layer["assignments"] == sum(layer["routed"]) for layer in layers)
    assert all(0 <= layer["skip_rate"] <= 1 for layer in layers)
    assert {layer["top_p"] for layer in layers} != {0.3}  # the controller moved p, alike on both ranks


def test_options_come_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text("steps = 4\nbatch-size = 2\ncontext = 16\ndim = 32\nlog_every = 2\nexperts = 4\n")
    main(
        ["train", "--config", str(config), "--steps", "3", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert "4 experts top-2" in out and "done: 3 steps" in out  # the command line wins for --steps
    config.write_text("stepz = 4\n")
    with pytest.raises(SystemExit, match="unknown option 'stepz'"):
        main(["train", "--config", str(config)])


def test_train_records_a_routing_trace_and_a_resume_replaces_the_redone_steps(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text('trace = "routing.jsonl.gz"\n')  # relative: inside the run directory
    args = ["--config", str(config), *SMALL, "--eval-every", "2", "--run-dir", str(run), "--no-progress"]
    main(["train", *args, "--checkpoint-every", "3"])
    trace = read_routing_trace(run / "routing.jsonl.gz")
    assert trace.layers == ["blocks.0.moe", "blocks.1.moe"] and (trace.num_experts, trace.top_k) == (8, 2)
    assert [r.step for r in trace.records] == [s for s in range(1, 7) for _ in range(2)]  # evals not recorded
    assert all(r.tokens == 4 * 32 and sum(r.counts) == 4 * 32 * 2 for r in trace.records)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in logged if r.get("step") == 6 and "layers" in r)
    assert [list(r.counts) for r in trace.records[-2:]] == [layer["routed"] for layer in last["layers"]]
    # Resumed from step 3: the trace keeps steps 1-3 and records 4-5 again.
    main(["train", *args, "--resume", str(run / "checkpoints" / "step-000003"), "--steps", "5"])
    assert "recording the routing" in capsys.readouterr().out
    steps = [r.step for r in read_routing_trace(run / "routing.jsonl.gz").records]
    assert steps == [s for s in range(1, 6) for _ in range(2)]


def test_train_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe.cli", "train", "--steps", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == "flexmoe train: error: argument --steps: must be an integer >= 1, got 0\n"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_main_job_on_two_workers_and_checkpoints_across_worker_counts(tmp_path, capsys):
    # The README's distributed main-job command, shortened; then its checkpoint resumes on
    # one worker, and a one-worker checkpoint resumes on two: the loss after loading matches.
    two = tmp_path / "two"
    # `scripts/main.sh` is this command after setting up .venv (which a test must not touch).
    result = run_cli(
        "train",
        "--workers",
        "2",
        *SMALL,
        "--plan-d",
        "2",
        "--exchange",
        "2dh",
        "--reroute",
        "shadow",
        "--run-dir",
        str(two),
    )
    out = result.stdout
    assert "2 worker(s)" in out and "8 experts over 2 workers (4 per worker)" in out, out
    assert "step     6" in out and "done: 6 steps" in out, out
    assert "plan Plan(r=1, d=2, exchange='2dh', reroute='shadow')" in out, out
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    plans = {layer["plan"] for r in logged if "layers" in r for layer in r["layers"]}
    assert plans and all(p.startswith("r=1,d=2,2dh") and "reroute" not in p for p in plans), plans

    one = tmp_path / "one"
    main(["train", *SMALL, "--steps", "7", "--resume", str(two), "--run-dir", str(one), "--no-progress"])
    assert "resumed from" in capsys.readouterr().out
    assert _summary(one)["initial_eval_loss"] == pytest.approx(_summary(two)["final_eval_loss"], rel=1e-5)

    # And back: the one-worker checkpoint on two workers.
    again = tmp_path / "again"
    result = run_cli(
        "train",
        "--workers",
        "2",
        *SMALL,
        "--steps",
        "9",  # two more steps, with the online tuner
        "--plan",
        "auto",
        "--resume",
        str(one),
        "--run-dir",
        str(again),
    )
    assert "plan auto (the online tuner)" in result.stdout, result.stdout
    tuned = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert any(layer["tuner"] == "search" for r in tuned if "layers" in r for layer in r["layers"])
    assert _summary(again)["initial_eval_loss"] == pytest.approx(_summary(one)["final_eval_loss"], rel=1e-5)
