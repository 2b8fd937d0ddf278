"""Every Python example in the README runs; its torchrun example runs on 2 workers."""

import re
from pathlib import Path

import pytest

from .test_docs import run_on_two_workers

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_readme_torchrun_example_runs_on_two_workers(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- torchrun example -->\n```python\n(.*?)```", text, flags=re.S)
    assert block, "the README's torchrun example is missing"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    result = run_on_two_workers(script)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"rank {rank}/2: loss" in result.stdout, result.stdout
    assert "plan used Plan(r=1, d=2, exchange='2dh', reroute=False)" in result.stdout, result.stdout
