"""`flexmoe train --tensorboard DIR`: the event file holds the scalars of metrics.jsonl, also after
an error, and a missing extra is one clear line."""

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import flexmoe.cli.train
from flexmoe.cli import main

from .cli_helpers import refusal

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress"]


def _events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _expected(lines: list[str]) -> dict[str, list[tuple[int, float]]]:
    """The scalars of metrics.jsonl lines, read here independently of flexmoe's own mapping."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        record = json.loads(line)
        if "eval_loss" in record:
            out.setdefault("eval/loss", []).append((record["step"], record["eval_loss"]))
            continue
        columns = record["per_step"]
        for name in ("loss", "lr", "aux_loss", "grad_norm"):
            out.setdefault(f"train/{name}", []).extend(zip(columns["step"], columns[name], strict=True))
        for name in ("dropped", "rerouted_rows", "expert_copies", "experts_per_token", "skip_rate", "top_p"):
            values = columns["layers"][0][name]
            points = [(s, v) for s, v in zip(columns["step"], values, strict=True) if v is not None]
            if points:  # top_p is null without top-p routing: no event
                out.setdefault(f"layer0/{name}", []).extend(points)
        out.setdefault("train/tokens_per_s", []).append((record["step"], record["tokens_per_s"]))
        load = record["layers"][0]["load_max_over_mean"]
        out.setdefault("layer0/load_max_over_mean", []).append((record["step"], load))
    return out


def test_tensorboard_scalars_equal_the_metrics_file(tmp_path, capsys):
    run, board = tmp_path / "run", tmp_path / "board"
    options = [*TINY, "--log-every", "3", "--eval-every", "4", "--run-dir", str(run)]
    main(["train", *options, "--steps", "7"])
    first = len((run / "metrics.jsonl").read_text().splitlines())
    # A resumed run into the same directory: its lines of metrics.jsonl are its events.
    main(["train", *options, "--steps", "12", "--resume", str(run), "--tensorboard", str(board)])
    events = _events(board)
    expected = _expected((run / "metrics.jsonl").read_text().splitlines()[first:])
    assert sorted(events) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in events["train/loss"]] == list(range(8, 13))
    assert [s for s, _ in events["eval/loss"]] == [7, 8, 12]


def test_tensorboard_events_are_flushed_when_training_fails(tmp_path, monkeypatch):
    board = tmp_path / "board"
    real_step = flexmoe.cli.train.train_step

    def failing_step(trainer, x, y, *, step):
        if step == 5:
            raise RuntimeError("out of memory (simulated)")
        return real_step(trainer, x, y, step=step)

    monkeypatch.setattr(flexmoe.cli.train, "train_step", failing_step)
    argv = ["train", *TINY, "--steps", "6", "--log-every", "2", "--run-dir", str(tmp_path / "run")]
    with pytest.raises(RuntimeError, match="simulated"):
        main([*argv, "--tensorboard", str(board)])
    assert [s for s, _ in _events(board)["train/loss"]] == [1, 2, 3, 4]


def test_a_missing_tensorboard_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    argv = ["train", *TINY, "--steps", "1", "--run-dir", str(tmp_path / "run")]
    assert refusal([*argv, "--tensorboard", str(tmp_path / "tb")], capsys) == (
        "flexmoe train: error: argument --tensorboard: needs the tensorboard package: "
        "pip install 'flexmoe[tensorboard]'"
    )
    assert not (tmp_path / "run").exists()
