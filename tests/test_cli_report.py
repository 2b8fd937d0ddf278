"""`flexmoe report`: reads old and new metrics formats, draws what the run has to show (and not
what it has not), and writes a summary table of rounded values with units."""

import json
import re
from pathlib import Path

import pytest

from flexmoe.cli import main
from flexmoe.cli.report import read_run, render_report, summary_rows
from flexmoe.cli.report_plots import ema, plan_segments

from .cli_helpers import layer_record, old_run_dir, per_step_record, refusal, varied_run_dir, write_run

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress"]


def _page_files(run: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', (run / "report.html").read_text())


def test_report_renders_an_older_run(tmp_path):
    run = old_run_dir(tmp_path / "run")
    main(["report", str(run)])
    assert _page_files(run) == ["loss.png", "throughput.png", "load_layer0.png"]
    series = read_run(run).steps
    assert not series.every_step and series.step == [1, 2] and series.loss == [4.0, 3.0]
    assert "None" not in (run / "report.html").read_text()


def test_report_shows_every_step_of_a_real_run_and_no_drops_when_dropless(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", *TINY, "--steps", "7", "--log-every", "3", "--eval-every", "4", "--run-dir", str(run)])
    capsys.readouterr()
    main(["report", str(run)])
    assert "wrote" in capsys.readouterr().out
    series = read_run(run).steps
    assert series.every_step and series.step == list(range(1, 8))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "per_step" in r] == [series.loss[2], series.loss[5], series.loss[6]]
    files = _page_files(run)
    assert files[:5] == ["loss.png", "lr.png", "aux_loss.png", "grad_norm.png", "throughput.png"]
    assert "dropped.png" not in files and "plans.png" not in files and "rerouting.png" not in files
    rows = dict(summary_rows(read_run(run)))
    assert rows["dropped assignments"] == "dropless (capacity factor 0)"
    assert rows["parallel plan"] == "d=1,flat (every layer, every step)"
    assert rows["rerouting"] == "none"


def test_the_summary_table_is_rounded_with_units_and_never_none(tmp_path):
    run = old_run_dir(tmp_path / "run")
    summary = {
        "steps": 400,
        "tokens": 819200,
        "seconds": 82.55879167600006,
        "tokens_per_s": 9922.69312345,
        "initial_eval_loss": 5.551854729652405,
        "final_eval_loss": 2.3456789,
        "world_size": 1,
        "checkpoint": "runs/x/checkpoints/step-000400",
        "expert_backend": None,
        "trace": None,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.json").write_text(json.dumps({"lr": 0.0030000000000000001, "trace": None, "steps": 400}))
    render_report(run)
    page = (run / "report.html").read_text()
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells and not [c for c in cells if re.search(r"\d\.\d{5,}|None", c)], cells
    rows = dict(summary_rows(read_run(run)))
    assert rows["wall time"] == "1 min 23 s" and rows["throughput"] == "9,923 tokens/s (all workers)"
    assert rows["evaluation loss"] == "5.552 → 2.346 nats/byte" and rows["tokens trained"] == "819,200"
    assert rows["expert backend"] == "—" and "routing trace" not in rows
    assert "<th>--trace</th><td>—</td>" in page and "<th>--lr</th><td>0.003</td>" in page


def test_report_charts_varying_plans_drops_and_rerouting(tmp_path):
    run = varied_run_dir(tmp_path / "run")
    render_report(run)
    assert {"plans.png", "dropped.png", "rerouting.png"} <= set(_page_files(run))
    assert all((run / name).stat().st_size > 1000 for name in _page_files(run))
    rows = dict(summary_rows(read_run(run)))
    assert rows["dropped assignments"] == "4 of 16 assignments (25.00 %), capacity factor 1.25"
    assert rows["parallel plan"].startswith("3 plans over the run")
    assert rows["rerouting"] == "12 rows computed on another rank, 6 expert copies sent"


def test_a_step_logged_twice_keeps_its_newest_value_and_old_records_mix_with_new(tmp_path):
    old = {"step": 2, "loss": 9.0, "tokens_per_s": 1.0, "lr": 1e-3, "layers": [layer_record([3, 1])]}
    redone = per_step_record([2, 3], ["d=1,flat"] * 2, [0, 0], [0, 0])  # a resume from step 1
    series = read_run(write_run(tmp_path / "run", [old, redone])).steps
    assert series.step == [2, 3] and series.loss == pytest.approx([4.8, 4.7])
    assert not series.every_step  # the old record has no per-step columns


def test_segments_and_smoothing():
    segments = plan_segments([1, 2, 3, 4], ["a", "a", "b", "a"])
    assert segments == [(0.5, 2.0, "a"), (2.5, 1.0, "b"), (3.5, 1.0, "a")]
    assert plan_segments([10, 20], ["a", "b"]) == [(0.5, 10.0, "a"), (10.5, 10.0, "b")]
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    assert ema([0.0, 10.0], weight=0.5)[1] == pytest.approx(10 * 0.5 / 0.75)


BAD_RUNS = [
    ("metrics.jsonl", b"\xff\xfe\x00\x01", "metrics.jsonl: not UTF-8 text (byte 0)"),
    (
        "metrics.jsonl",
        b'{"step": 1, "loss": 1.0}\n',
        "metrics.jsonl:1: 'tokens_per_s' must be a number, got None",
    ),
    ("metrics.jsonl", b"{not json\n", "metrics.jsonl:1: not a JSON line"),
    ("metrics.jsonl", b"[1]\n", "metrics.jsonl:1: expected a JSON object, got list"),
    ("metrics.jsonl", b'{"step": 0, "eval_loss": 5}\n', "metrics.jsonl holds no training steps yet"),
    (
        "metrics.jsonl",
        json.dumps(
            {**per_step_record([1], ["d=1,flat"], [0], [0]), "per_step": {"step": [1], "loss": []}}
        ).encode(),
        "metrics.jsonl:1: 'per_step': 'loss' must be a list of 1 numbers",
    ),
    ("config.json", b"{oops", "config.json: not JSON"),
    ("summary.json", b"\xc3\x28", "summary.json: not UTF-8 text"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_RUNS, ids=[m for _, _, m in BAD_RUNS])
def test_report_names_a_corrupt_file(tmp_path, capsys, name, content, message):
    run = old_run_dir(tmp_path / "run")
    (run / name).write_bytes(content)
    err = refusal(["report", str(run)], capsys)
    assert err.startswith(f"flexmoe report: error: {run / message}"), err


def test_report_names_a_missing_file_or_folder(tmp_path, capsys):
    run = old_run_dir(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    assert refusal(["report", str(run)], capsys).startswith(
        f"flexmoe report: error: {run / 'metrics.jsonl'} is missing"
    )
    assert "is not a directory" in refusal(["report", str(tmp_path / "nowhere")], capsys)


def test_experts_per_token_is_drawn_only_when_recorded_and_varying(tmp_path):
    run = varied_run_dir(tmp_path / "constant")
    render_report(run)
    assert "experts_per_token.png" not in _page_files(run)  # the records do not hold it
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for value, record in zip((1.5, 1.75), (r for r in records if "layers" in r), strict=True):
        record["layers"][0]["experts_per_token"] = value
    varied = write_run(tmp_path / "varied", records)
    render_report(varied)
    assert "experts_per_token.png" in _page_files(varied)
