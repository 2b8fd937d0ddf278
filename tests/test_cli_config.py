"""`flexmoe train`'s configuration (issue 14, item 4): one typed TrainConfig from flags and
--config, every bad value refused in one argparse-style line naming the option (exit code 2,
no traceback), and a --help that shows every option's default."""

import argparse
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexmoe.cli import build_parser
from flexmoe.cli.options import OptionError
from flexmoe.cli.train_config import TrainConfig, train_config_from_args

from .cli_helpers import refusal

TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--experts", "4", "--expert-hidden", "16"]
TINY += ["--batch-size", "2", "--context", "16", "--no-progress"]


# (file text, the line after "--config FILE: "). Each is refused even though --steps is given
# on the command line too: the file itself is wrong.
BAD_FILES = [
    ("steps = 3.5", "steps: must be an integer >= 1, got 3.5"),
    ("steps = [1]", "steps: must be an integer >= 1, got [1]"),
    ("steps = true", "steps: must be an integer >= 1, got True"),
    ("resume = 5", "resume: must be a path (a non-empty string), got 5"),
    ('plan = "sideways"', "plan: must be one of 'fixed', 'auto', got 'sideways'"),
    ('no-progress = "yes"', "no-progress: must be true or false, got 'yes'"),
    ("lr = -0.1", "lr: must be a finite number > 0, got -0.1"),
    ("lr = nan", "lr: must be a finite number > 0, got nan"),
    ("layers = 0", "layers: must be an integer >= 1, got 0"),
    ("top-k = 9", "top-k: must be <= --experts (4), got 9"),  # cross-field, against a flag
    ("stepz = 4", "unknown option 'stepz' (did you mean 'steps'?)"),
    ("[model]\ndim = 8", "unknown option 'model'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_config_file_values_are_checked(tmp_path, capsys, text, message):
    config = tmp_path / "train.toml"
    config.write_text(text + "\n")
    err = refusal(["train", *TINY, "--config", str(config), "--steps", "1"], capsys)
    assert err == f"flexmoe train: error: --config {config}: {message}"


def test_json_config_files_are_checked_the_same_way(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"steps": 2.5}))
    assert refusal(["train", "--config", str(config)], capsys).endswith(
        "steps: must be an integer >= 1, got 2.5"
    )
    config.write_text("[1, 2]")
    assert "must hold a table of options, got list" in refusal(["train", "--config", str(config)], capsys)
    config.write_bytes(b"\xff\xfe{}")
    assert "argument --config: cannot read" in refusal(["train", "--config", str(config)], capsys)
    missing = tmp_path / "missing.toml"
    assert f"cannot read {missing}" in refusal(["train", "--config", str(missing)], capsys)


BAD_FLAGS = [
    (["--experts", "3", "--top-k", "5"], "argument --top-k: must be <= --experts (3), got 5"),
    (["--layers", "0"], "argument --layers: must be an integer >= 1, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--dim", "30", "--heads", "4"], "argument --heads: must divide --dim (30), got 4"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be an integer >= 0, got -1"),
    (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be an integer >= 1, got 0"),
    (["--workers", "100000"], "argument --workers: must be an integer in [1, 256], got 100000"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 9.22337e+18], got -1"),
    (["--steps", "abc"], "argument --steps: expected an integer, got 'abc' (see `flexmoe train --help`)"),
    (["--top-p", "0"], "argument --top-p: must be a finite number > 0, got 0.0"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number in (0, 1], got 1.5"),
    (["--top-k", "2", "--min-k", "3"], "argument --min-k: must be <= --top-k (2), got 3"),
    (["--top-p", "0.5", "--workers", "2"], "argument --top-p: runs on a single worker"),
    (
        ["--workers", "2", "--experts", "3"],
        "argument --experts: cannot be spread over 2 workers: num_experts=3",
    ),
    (
        ["--workers", "2", "--plan-r", "3"],
        "argument --plan-r: gives no valid plan on 2 workers: plan.r must be",
    ),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_in_one_line(capsys, flags, message):
    err = refusal(["train", *flags], capsys)
    assert err.startswith(f"flexmoe train: error: {message}"), err


def test_plan_choices_are_refused_by_argparse_in_one_line(capsys):
    err = refusal(["train", "--plan", "sideways"], capsys)
    assert err.startswith("flexmoe train: error: argument --plan: invalid choice: 'sideways'")


def test_a_context_longer_than_the_text_is_refused(tmp_path, capsys):
    err = refusal(["train", *TINY, "--context", "100000000", "--run-dir", str(tmp_path)], capsys)
    assert err.startswith("flexmoe train: error: argument --context: must be <= ")


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    # What the issue reproduced: 36-line tracebacks for --experts 3 --top-k 5 and --layers 0.
    for flags in (["--experts", "3", "--top-k", "5"], ["--layers", "0"]):
        result = subprocess.run(
            [sys.executable, "-m", "flexmoe.cli", "train", *flags],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_the_command_line_wins_over_the_file(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('steps = 4\nbatch-size = 2\nexperts = 4\nrun_dir = "r"\n')
    args = build_parser().parse_args(["train", "--config", str(config), "--steps", "3"])
    train_config = train_config_from_args(args)
    assert (train_config.steps, train_config.batch_size, train_config.experts) == (3, 2, 4)
    assert str(train_config.run_dir) == "r"
    demo = train_config_from_args(build_parser().parse_args(["demo"]))
    assert demo.steps == 150 and demo == TrainConfig(steps=150)


def test_the_dataclass_refuses_bad_values_itself():
    with pytest.raises(OptionError, match="steps must be an integer >= 1, got True") as caught:
        TrainConfig(steps=True)
    assert isinstance(caught.value, ValueError) and caught.value.option == "steps"
    with pytest.raises(ValueError, match="top_k must be <= --experts"):
        TrainConfig(experts=2, top_k=3)
    assert TrainConfig(capacity_factor=1).capacity_factor == 1.0  # an int is a fine float
    with pytest.raises(AttributeError):
        TrainConfig().steps = 5  # type: ignore[misc]  # frozen


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{first flag: its --help entry}``: an entry starts with "  -" and runs to the next one."""
    entries: dict[str, str] = {}
    current = None
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["train", "demo", "plan", "calibrate", "generate"])
def test_help_shows_a_line_and_the_default_of_every_option(command):
    parser = _subparser(command)
    entries = _help_entries(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 5
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
        entry = entries[action.option_strings[0]]
        assert "(default:" in entry, entry


@st.composite
def train_configs(draw) -> TrainConfig:
    heads = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 16))
    return TrainConfig(
        steps=draw(st.integers(1, 10**6)),
        dim=heads * draw(st.integers(1, 32)),
        heads=heads,
        experts=experts,
        top_k=draw(st.integers(1, experts)),
        lr=draw(st.floats(1e-6, 1.0)),
        capacity_factor=draw(st.floats(-4, 4)),
        seed=draw(st.integers(0, 2**63 - 1)),
        no_progress=draw(st.booleans()),
        plan=draw(st.sampled_from(["fixed", "auto"])),
        plan_r=draw(st.none() | st.integers(0, 4)),
        reroute=draw(st.sampled_from(["auto", "on", "shadow", "off"])),
        resume=draw(st.none() | st.just("runs/a b")),
    )


@given(train_configs())
def test_to_argv_rebuilds_the_same_config(config):
    # What the launcher hands its workers: the validated config, as flags.
    args = build_parser().parse_args(["train", *config.to_argv()])
    assert train_config_from_args(args) == config
