"""Shared helpers of the CLI tests."""

from __future__ import annotations

import pytest

from flexmoe.cli import main


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``main(argv)`` prints when it refuses ``argv`` (exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.rstrip("\n")
