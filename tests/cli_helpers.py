"""Shared helpers of the CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

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


def layer_record(routed: list[int]) -> dict:
    return {"routed": routed, "dropped": 0, "assignments": sum(routed), "plan": "d=1,flat"}


def write_run(folder: Path, records: list[dict], config: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.json").write_text(json.dumps(config or {"steps": 2}))
    return folder


def old_run_dir(folder: Path) -> Path:
    """A run directory in the older format: no per-step columns (two logged steps, one evaluation)."""
    records = [
        {"step": 0, "eval_loss": 5.5},
        *(
            {"step": s, "loss": 5.0 - s, "tokens_per_s": 1000.0, "layers": [layer_record([3, 1])]}
            for s in (1, 2)
        ),
    ]
    return write_run(folder, records)


def per_step_record(steps: list[int], plans: list[str], dropped: list[int], rerouted: list[int]) -> dict:
    """A logged record in the current format (one layer of two experts) covering ``steps``."""
    n = len(steps)
    layer = {**layer_record([3, 1]), "plan": plans[-1], "capacity": 4 if any(dropped) else None}
    return {
        "step": steps[-1],
        "loss": 4.0,
        "tokens_per_s": 1000.0,
        "layers": [layer],
        "per_step": {
            "step": steps,
            "loss": [5.0 - 0.1 * s for s in steps],
            "lr": [1e-3] * n,
            "aux_loss": [0.01] * n,
            "grad_norm": [1.5] * n,
            "layers": [
                {
                    "plan": plans,
                    "tuner": ["search" if p != plans[-1] else "tuned" for p in plans],
                    "dropped": dropped,
                    "rerouted_rows": rerouted,
                    "expert_copies": [r // 2 for r in rerouted],
                }
            ],
        },
    }


def varied_run_dir(folder: Path) -> Path:
    """A run directory in the current format whose plans change, with drops and rerouting."""
    plans = ["d=1,flat", "d=2,flat", "d=2,2dh", "d=2,2dh"]
    records = [
        per_step_record([1, 2], plans[:2], [0, 3], [0, 8]),
        {"step": 2, "eval_loss": 4.5},
        per_step_record([3, 4], plans[2:], [1, 0], [4, 0]),
    ]
    return write_run(folder, records, {"capacity_factor": 1.25})
