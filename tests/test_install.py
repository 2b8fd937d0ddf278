"""flexmoe as a user gets it: a wheel, installed into a fresh virtual environment.

The wheel is built from a copy of the sources (the checkout stays clean) and installed
with the ``hf`` extra into a new venv that sees none of the development environment's
packages, torch first from the pinned CPU file, as the README says. The installed
``flexmoe`` and ``python -m flexmoe`` then run from an empty directory without
``PYTHONPATH``, so nothing can come from the source tree.

Cost, measured on the 2-core CI machine: about 40 s in all. ``--no-compile`` is what
keeps it there: byte-compiling torch at install time took ~20 s of it, while the few
modules a run imports compile on first use. ``--no-isolation`` builds with the
development environment's setuptools instead of downloading one per build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per command: a hung install fails the test instead of CI


def _run(command: list[str | Path], cwd: Path) -> str:
    """Run ``command`` without ``PYTHONPATH``; its stdout, or a failure with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src" / "flexmoe", source / "src" / "flexmoe", ignore=shutil.ignore_patterns("__pycache__")
    )
    _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist", source], work
    )
    (wheel,) = (work / "dist").glob("flexmoe-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """``(venv bin folder, an empty working directory)`` with the built wheel installed."""
    work = tmp_path_factory.mktemp("install")
    wheel = _build_wheel(work)
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv], work)
    pip = [
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
    ]
    _run([*pip, "-r", ROOT / "requirements" / "torch-cpu.txt"], work)
    _run([*pip, "-c", ROOT / "requirements" / "tested.txt", f"{wheel}[hf]"], work)
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    yield venv / "bin", elsewhere
    shutil.rmtree(work, ignore_errors=True)  # the venv holds a torch install: over a gigabyte


def test_the_commands_run_from_the_wheel(installed):
    bin_dir, cwd = installed
    assert "usage: flexmoe" in _run([bin_dir / "flexmoe", "--help"], cwd)
    assert "usage: flexmoe" in _run([bin_dir / "python", "-m", "flexmoe", "--help"], cwd)


def test_the_package_and_its_data_come_from_the_venv(installed):
    bin_dir, cwd = installed
    probe = (
        "import json, flexmoe, torch, transformers\n"
        "from flexmoe.planner import load_cluster\n"
        "print(json.dumps([flexmoe.__file__, load_cluster('h100-80gb-ndr400').name, torch.__version__]))\n"
    )
    module_file, preset, torch_version = json.loads(_run([bin_dir / "python", "-c", probe], cwd))
    assert Path(module_file).is_relative_to(bin_dir.parent), module_file
    assert preset == "h100-80gb-ndr400"
    assert torch_version.endswith("+cpu")
    with pytest.raises(AssertionError, match="No module named 'pytest'"):
        _run([bin_dir / "python", "-c", "import pytest"], cwd)  # none of the dev environment's packages


def test_a_short_training_run_from_the_wheel(installed):
    bin_dir, cwd = installed
    run_dir = cwd / "run"
    tiny = "--dim 16 --layers 1 --heads 2 --experts 4 --expert-hidden 16 --batch-size 2 --context 16"
    _run(
        [bin_dir / "flexmoe", "train", *tiny.split(), "--no-progress", "--steps", "3", "--run-dir", run_dir],
        cwd,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3, summary
