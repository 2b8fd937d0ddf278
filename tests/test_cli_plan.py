"""`flexmoe plan` answers bad input in one line (issue 14, item 4): device counts, experts,
absurd scales (refused at once, not computed for minutes), plot paths."""

import time
from pathlib import Path

import pytest

from flexmoe.cli import main
from flexmoe.cli.plan import plot_paths

from .cli_helpers import refusal

BAD_PLANS = [
    (["--devices", "0"], "argument --devices: expected an integer in [1, 8192], got '0'"),
    (["--experts", "0"], "argument --experts: expected an integer in [1, 65536], got '0'"),
    (["--devices", "100000"], "argument --devices: expected an integer in [1, 8192], got '100000'"),
    (
        ["--sweep-devices", "16,100000"],
        "argument --sweep-devices: expected comma-separated integers in [1, 8192]",
    ),
    (["--experts", "3", "--top-k", "5"], "argument --top-k: must be <= the experts (3), got 5"),
    (["--top-k", "0"], "argument --top-k: expected an integer >= 1, got '0'"),
    (["--memory-budget-gb", "-1"], "argument --memory-budget-gb: expected a finite number > 0, got '-1'"),
    (["--plot", "out"], "argument --plot: needs --sweep-devices (a plot is of a sweep)"),
    (["--sweep-devices", "16", "--devices", "8"], "argument --devices: not allowed with --sweep-devices"),
    (
        ["--experts", "8", "--experts-per-device", "2"],
        "argument --experts-per-device: not allowed with --experts",
    ),
    (
        ["--sweep-devices", "8192", "--experts-per-device", "16"],
        "argument --experts-per-device: 16 per device",
    ),
    (["--degrees", "0,1"], "argument --degrees: expected comma-separated integers in [1, 64]"),
    (["--load", "pareto:2"], "bad --load 'pareto:2'"),
    (["--cluster", "nowhere"], "argument --cluster: cannot use 'nowhere': unknown cluster 'nowhere'"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_PLANS, ids=[" ".join(f) for f, _ in BAD_PLANS])
def test_bad_plan_options_are_refused_in_one_line(capsys, flags, message):
    started = time.perf_counter()
    err = refusal(["plan", *flags], capsys)
    assert err.startswith(f"flexmoe plan: error: {message}"), err
    assert time.perf_counter() - started < 5  # refused, not computed


def test_a_malformed_cluster_file_is_named(tmp_path, capsys):
    cluster = tmp_path / "cluster.json"
    cluster.write_text("[1, 2]")
    err = refusal(["plan", "--cluster", str(cluster)], capsys)
    assert err.startswith(f"flexmoe plan: error: argument --cluster: cannot use '{cluster}'")


def test_a_plot_into_a_missing_folder_is_refused(tmp_path, capsys):
    err = refusal(["plan", "--sweep-devices", "16", "--plot", str(tmp_path / "no" / "out")], capsys)
    assert err.endswith("does not exist")


def test_plot_paths_keep_every_dot_of_the_name():
    assert plot_paths("out.v1") == (Path("out.v1.png"), Path("out.v1.svg"))
    assert plot_paths("docs/sweep") == (Path("docs/sweep.png"), Path("docs/sweep.svg"))
    assert plot_paths("a/b.png") == (Path("a/b.png"), Path("a/b.svg"))
    assert plot_paths("a/b.v2.svg") == (Path("a/b.v2.png"), Path("a/b.v2.svg"))


def test_plot_writes_the_name_it_was_given(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["plan", "--sweep-devices", "16,32", "--plot", str(tmp_path / "out.v1")])
    assert f"wrote {tmp_path / 'out.v1.png'}, {tmp_path / 'out.v1.svg'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.v1.png", "out.v1.svg"]  # no scratch left
