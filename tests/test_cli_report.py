"""`flexmoe report` names a missing or corrupt file of the run directory in one line (issue 14,
item 4), instead of a UnicodeDecodeError or KeyError traceback."""

import json
from pathlib import Path

import pytest

from flexmoe.cli import main

from .cli_helpers import refusal


def _layer(routed: list[int]) -> dict:
    return {"routed": routed, "dropped": 0, "assignments": sum(routed), "plan": "d=1,flat"}


def _run_dir(folder: Path) -> Path:
    """A run directory as `flexmoe train` writes it (two logged steps, one evaluation)."""
    folder.mkdir()
    records = [
        {"step": 0, "eval_loss": 5.5},
        *({"step": s, "loss": 5.0 - s, "tokens_per_s": 1000.0, "layers": [_layer([3, 1])]} for s in (1, 2)),
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text(json.dumps({"steps": 2}))
    return folder


def test_report_renders_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path / "run")
    main(["report", str(run)])
    assert (run / "report.html").stat().st_size > 0 and (run / "load_layer0.png").stat().st_size > 0


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
    ("config.json", b"{oops", "config.json: not JSON"),
    ("summary.json", b"\xc3\x28", "summary.json: not UTF-8 text"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_RUNS, ids=[m for _, _, m in BAD_RUNS])
def test_report_names_a_corrupt_file(tmp_path, capsys, name, content, message):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path / "run")
    (run / name).write_bytes(content)
    err = refusal(["report", str(run)], capsys)
    assert err.startswith(f"flexmoe report: error: {run / message}"), err


def test_report_names_a_missing_file_or_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _run_dir(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    assert refusal(["report", str(run)], capsys).startswith(
        f"flexmoe report: error: {run / 'metrics.jsonl'} is missing"
    )
    assert "is not a directory" in refusal(["report", str(tmp_path / "nowhere")], capsys)
