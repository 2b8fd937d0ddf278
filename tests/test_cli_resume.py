"""Exact resume of `flexmoe train` (issue 14): a run interrupted at any step and resumed from its
checkpoint gives the same losses and weights, bit for bit, as a run never interrupted; and the
learning-rate schedule needs no fast-forward, so a checkpoint claiming step 10**12 is answered at once."""

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from flexmoe.checkpoint import save_checkpoint
from flexmoe.cli import main
from flexmoe.cli.train import build, learning_rate, train
from flexmoe.cli.train_config import TrainConfig

from .distributed import run_distributed

TINY = dict(dim=16, layers=1, heads=2, experts=4, top_k=2, expert_hidden=16, batch_size=2, context=16)


def _argv(**options) -> list[str]:
    return TrainConfig(**{**TINY, "no_progress": True, "log_every": 1, **options}).to_argv()


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``step``: weights and optimizer state, all ranks' files."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ after the resume: {different}"


@settings(max_examples=10)
@given(
    steps=st.integers(2, 6),
    interrupted_at=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    warmup=st.integers(0, 4),
    layers=st.integers(1, 2),
)
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(
    tmp_path_factory, steps, interrupted_at, seed, warmup, layers
):
    # The uninterrupted run checkpoints every step; the checkpoint at step k is what a run
    # killed during step k + 1 leaves behind. Resumed from it, the rest must match exactly.
    k = min(interrupted_at, steps - 1)
    root = tmp_path_factory.mktemp("resume")
    shape = dict(steps=steps, seed=seed, warmup=warmup, layers=layers)
    main(["train", *_argv(**shape, checkpoint_every=1, keep_checkpoints=steps, run_dir=root / "straight")])
    checkpoint = root / "straight" / "checkpoints" / f"step-{k:06d}"
    main(["train", *_argv(**shape, resume=checkpoint, run_dir=root / "resumed")])
    straight, resumed = _losses(root / "straight"), _losses(root / "resumed")
    assert sorted(resumed) == list(range(k + 1, steps + 1))
    assert {s: straight[s] for s in resumed} == resumed  # exact floats, not approx
    _assert_identical(_tensors(root / "straight", steps), _tensors(root / "resumed", steps))


def _two_workers(rank: int, world: int, root: str) -> None:
    # Straight: 4 steps with checkpoints at 2 and 4; then, in the same processes, a resume
    # from step 2. A fixed plan (rerouting off) so both runs execute the same collectives.
    shape = dict(**TINY, steps=4, no_progress=True, log_every=1, reroute="off", workers=2)
    train(TrainConfig(**shape, checkpoint_every=2, run_dir=Path(root) / "straight"), rank, world)
    resume = Path(root) / "straight" / "checkpoints" / "step-000002"
    train(TrainConfig(**shape, resume=resume, run_dir=Path(root) / "resumed"), rank, world)


@pytest.mark.distributed
def test_a_resumed_two_worker_run_is_bit_identical(tmp_path):
    run_distributed(_two_workers, 2, str(tmp_path), timeout=180)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and {s: straight[s] for s in resumed} == resumed
    _assert_identical(_tensors(tmp_path / "straight", 4), _tensors(tmp_path / "resumed", 4))
    # On one worker with the same global batch (2 x 2 -> 1 x 4): the same data, the same
    # losses up to rounding (the experts are re-sharded on load).
    one = TINY | dict(batch_size=4, steps=4, no_progress=True, log_every=1, reroute="off")
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000002"
    train(TrainConfig(**one, resume=checkpoint, run_dir=tmp_path / "one"), 0, 1)
    assert _losses(tmp_path / "one") == pytest.approx(resumed, rel=1e-5)


def test_learning_rate_is_a_function_of_the_step():
    config = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert learning_rate(config, 1) == pytest.approx(0.1)  # warm-up
    assert learning_rate(config, 10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.09 * math.pi)))
    assert learning_rate(config, 101) == pytest.approx(0.1)  # the floor: 10 % of the peak
    started = time.perf_counter()
    assert learning_rate(TrainConfig(steps=10**13, lr=1.0), 10**12) > 0
    assert time.perf_counter() - started < 0.01  # no stepping through a schedule


def _checkpoint_at(step: int, folder: Path) -> None:
    """A checkpoint of the TINY model whose manifest says ``step``."""
    trainer = build(TrainConfig(**TINY, run_dir=folder), 0, 1)
    save_checkpoint(folder / "checkpoints", trainer.model, trainer.optimizer, step=step)


@contextlib.contextmanager
def _within(seconds: float):
    """Fail (``TimeoutError``) instead of hanging when the body runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_checkpoint_claiming_step_10_12_is_answered_at_once(tmp_path, capsys):
    # Before: the schedule was fast-forwarded one step at a time (centuries for 10**12 steps).
    huge = 10**12
    _checkpoint_at(huge, tmp_path / "claimed")
    argv = ["train", *_argv(steps=5), "--resume", str(tmp_path / "claimed")]
    with _within(30), pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flexmoe train: error: argument --resume: {tmp_path / 'claimed' / 'checkpoints'} is at step {huge}, "
        "not before --steps 5: nothing to train (raise --steps to continue it)"
    ]
    # Continuing it for two steps takes no longer than any two steps (the later --steps wins).
    with _within(30):
        main([*argv, "--steps", str(huge + 2), "--run-dir", str(tmp_path / "on")])
    assert sorted(_losses(tmp_path / "on")) == [huge + 1, huge + 2]
