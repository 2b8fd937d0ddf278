"""The main job runs end to end and learns."""

import re
import subprocess
import sys
from pathlib import Path

from flexmoe.cli import main


def test_demo_trains_and_reports(capsys):
    main(
        ["demo", "--steps", "30", "--batch-size", "8", "--context", "64", "--dim", "64", "--log-every", "10"]
    )
    out = capsys.readouterr().out
    assert "step    30" in out
    match = re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", out)
    assert match, out
    initial, final = map(float, match.groups())
    assert final < initial - 0.5  # bytes of Python source are far from uniform


def test_demo_rejects_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe.cli", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "--steps must be >= 1" in result.stderr


SMALL = ["--steps", "6", "--log-every", "3", "--batch-size", "4", "--context", "32", "--dim", "32"]


def test_distributed_main_job_runs_on_two_workers():
    # The README's distributed main-job command, shortened.
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["bash", "scripts/main.sh", "--workers", "2", *SMALL, "--plan-d", "2", "--exchange", "2dh"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "2 worker(s)" in out and "8 experts over 2 workers (4 per worker)" in out, out
    assert "step     6" in out and "done: 6 steps" in out, out
    assert "plan Plan(r=1, d=2, exchange='2dh')" in out, out
