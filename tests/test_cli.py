"""The main job runs end to end and learns."""

import re
import subprocess
import sys

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
