"""Checkpoints are checked before anything is loaded: every name in the manifest and in
``LATEST`` stays inside the checkpoint, every tensor (model, experts, optimizer state) has
the model's dtype and shape, and every tampered, truncated or foreign checkpoint is refused
with a ``CheckpointError`` naming what is wrong, leaving the model and optimizer untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flexmoe
from flexmoe.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

from .parallel_workers import checkpoint_model, checkpoint_train_step


def _saved(root: Path, bias: bool = True) -> Path:
    """A checkpoint of the trained checkpoint model (with AdamW state) under ``root``."""
    torch.manual_seed(0)
    model, optimizer = checkpoint_model(bias=bias)
    checkpoint_train_step(model, optimizer, 1)
    return save_checkpoint(root, model, optimizer, step=1)


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())  # type: ignore[no-any-return]


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def _read_raw(file: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as JSON) and its data bytes."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(file: Path, header: dict[str, Any] | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _file_of(path: Path, key: str) -> Path:
    return path / next(f for f, keys in _manifest(path)["files"].items() if key in keys)


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the checkpoint's safetensors files through ``edit`` and re-index the manifest."""
    manifest = _manifest(path)
    for fname in manifest["files"]:
        tensors = load_file(path / fname)
        edit(tensors)
        save_file(tensors, path / fname)
        manifest["files"][fname] = sorted(tensors)
    _write_manifest(path, manifest)


def _refused(root: Path, match: str, optimizer: bool = True, bias: bool = True) -> CheckpointError:
    """Loading ``root`` raises ``CheckpointError`` matching ``match`` and changes nothing."""
    torch.manual_seed(5)
    model, opt = checkpoint_model(bias=bias)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [dict(g, params=None) for g in opt.param_groups]
    with pytest.raises(CheckpointError, match=match) as caught:
        load_checkpoint(root, model, opt if optimizer else None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was loaded before the error"
    assert not opt.state and [dict(g, params=None) for g in opt.param_groups] == groups
    return caught.value


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/tmp/x.safetensors", "sub/model.safetensors", ".."]
)
def test_manifest_file_names_must_be_plain_names_inside_the_checkpoint(tmp_path, name):
    path = _saved(tmp_path / "run")
    shutil.copy(path / "model.safetensors", path.parent / "outside.safetensors")
    manifest = _manifest(path)
    manifest["files"][name] = manifest["files"].pop("model.safetensors")
    _write_manifest(path, manifest)
    _refused(tmp_path / "run", re.escape(f"file name {name!r}"))


def test_manifest_file_name_with_nul_is_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["files"]["model\x00.safetensors"] = manifest["files"].pop("model.safetensors")
    _write_manifest(path, manifest)
    _refused(tmp_path, "file name")


@pytest.mark.parametrize("name", ["../elsewhere/step-000001", "/abs/step-000001", "", "a\x00b", "step-1/.."])
def test_latest_must_name_a_checkpoint_inside_the_directory(tmp_path, name):
    _saved(tmp_path / "elsewhere")
    _saved(tmp_path / "run")
    (tmp_path / "run" / "LATEST").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="LATEST"):
        latest_checkpoint(tmp_path / "run")
    _refused(tmp_path / "run", "LATEST")


def test_latest_that_is_not_text_is_refused(tmp_path):
    _saved(tmp_path)
    (tmp_path / "LATEST").write_bytes(b"\xff\xfe\x00garbage")
    _refused(tmp_path, "LATEST")


def test_latest_naming_a_symlink_out_of_the_directory_is_refused(tmp_path):
    outside = _saved(tmp_path / "elsewhere")
    _saved(tmp_path / "run")
    (tmp_path / "run" / "step-000009").symlink_to(outside, target_is_directory=True)
    (tmp_path / "run" / "LATEST").write_text("step-000009\n")
    _refused(tmp_path / "run", "outside")


def test_a_checkpoint_file_that_links_out_of_the_checkpoint_is_refused(tmp_path):
    path = _saved(tmp_path / "run")
    other = _saved(tmp_path / "elsewhere")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(other / "model.safetensors")
    _refused(tmp_path / "run", "model.safetensors")


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize("key", ["0.weight", "1.experts.w_in.e1", "optim/0.weight/exp_avg"])
def test_a_tensor_whose_header_dtype_was_changed_is_refused(tmp_path, key):
    # F32 -> I32 keeps the byte size, so safetensors itself cannot notice: garbage values.
    path = _saved(tmp_path)
    file = _file_of(path, key)
    header, data = _read_raw(file)
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = "I32"
    _write_raw(file, header, data)
    error = _refused(tmp_path, key)
    assert "int32" in str(error) and "float32" in str(error)


@pytest.mark.parametrize(
    "key",
    ["0.weight", "1.router.weight", "1.experts.w_in.e1", "1.experts.b_out.e3", "optim/0.bias/exp_avg_sq"],
)
def test_a_wrongly_shaped_tensor_is_refused_before_anything_loads(tmp_path, key):
    path = _saved(tmp_path)

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        if key in tensors:
            tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)

    _edit_tensors(path, reshape)
    _refused(tmp_path, f"{key}.*shape")


def test_wrongly_shaped_expert_optimizer_state_is_refused_at_load(tmp_path):
    path = _saved(tmp_path)

    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith("optim/1.experts.w_out/exp_avg.")]:
            tensors[key] = tensors[key].t().contiguous()  # [16, 8] -> [8, 16]

    _edit_tensors(path, reshape)
    _refused(tmp_path, "optim/1.experts.w_out/exp_avg.e0.*shape")


@pytest.mark.parametrize(
    "key", ["0.weight", "1.experts.w_in.e2", "1.experts.b_out.e0", "optim/1.experts.w_in/exp_avg_sq.e3"]
)
def test_a_missing_tensor_is_refused(tmp_path, key):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda tensors: tensors.pop(key, None))
    _refused(tmp_path, key)


def test_optimizer_state_missing_for_every_expert_is_refused(tmp_path):
    # exp_avg_sq of w_in gone for all experts (file and manifest): the other parameters of
    # the group still have it, so this state is incomplete (AdamW would fail at its next step).
    path = _saved(tmp_path)

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if k.startswith("optim/1.experts.w_in/exp_avg_sq")]:
            del tensors[key]

    _edit_tensors(path, drop)
    _refused(tmp_path, "1.experts.w_in.*exp_avg_sq")


def test_a_tensor_the_model_lacks_is_refused(tmp_path):
    # A checkpoint of a model with one more dense layer.
    torch.manual_seed(0)
    bigger = nn.Sequential(nn.Linear(16, 16), flexmoe.MoELayer(16, 8, 4, 2, bias=True), nn.Linear(16, 16))
    save_checkpoint(tmp_path, bigger, step=0)
    _refused(tmp_path, "2.weight", optimizer=False)


def test_the_index_must_match_the_files(tmp_path):
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["files"]["model.safetensors"].remove("0.bias")  # in the file, not in the index
    _write_manifest(path, manifest)
    _refused(tmp_path, "0.bias")


def test_a_tensor_in_two_files_is_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["files"]["experts-rank0.safetensors"].append("0.weight")
    _write_manifest(path, manifest)
    _refused(tmp_path, "0.weight")


# ------------------------------------------------------------------ optimizers


class CountingSGD(torch.optim.Optimizer):
    """SGD with plain-Python state: an int step count, a float and a None per parameter."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["scale"] = 1.0 / (1 + state["count"])
                state["unused"] = None
                p.add_(p.grad, alpha=-group["lr"] * state["scale"])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
        lambda ps: CountingSGD(ps),
    ],
    ids=["sgd-momentum", "sgd", "adam-amsgrad", "adamw", "rmsprop", "python-state"],
)
def test_optimizer_state_round_trips_exactly(tmp_path, make):
    torch.manual_seed(0)
    model, _ = checkpoint_model(bias=True)
    optimizer = make(model.parameters())
    for seed in (1, 2):
        checkpoint_train_step(model, optimizer, seed)
    save_checkpoint(tmp_path, model, optimizer, step=2)
    want = [checkpoint_train_step(model, optimizer, s) for s in (3, 4)]

    torch.manual_seed(9)
    restored, _ = checkpoint_model(bias=True)
    restored_opt = make(restored.parameters())
    load_checkpoint(tmp_path, restored, restored_opt)
    assert [checkpoint_train_step(restored, restored_opt, s) for s in (3, 4)] == want
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
        a, b = optimizer.state[p], restored_opt.state[q]
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, key
            else:
                assert a[key] == b[key] and type(a[key]) is type(b[key]), key


def test_optimizer_over_other_parameters_is_refused(tmp_path):
    _saved(tmp_path)
    model, _ = checkpoint_model(bias=True)
    partial = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(CheckpointError, match="parameters"):
        load_checkpoint(tmp_path, model, partial)


def test_optimizer_state_that_is_not_a_tensor_or_json_value_is_refused_at_save(tmp_path):
    model, optimizer = checkpoint_model()
    checkpoint_train_step(model, optimizer, 1)
    optimizer.state[model[0].weight]["history"] = [torch.zeros(2)]
    with pytest.raises(CheckpointError, match="history"):
        save_checkpoint(tmp_path, model, optimizer, step=1)
    assert not (tmp_path / "LATEST").exists()


def test_an_optimizer_of_another_kind_or_setting_type_is_refused(tmp_path):
    _saved(tmp_path)  # AdamW
    model, _ = checkpoint_model(bias=True)
    with pytest.raises(CheckpointError, match="another kind of optimizer"):
        load_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    path = latest_checkpoint(tmp_path)
    manifest = _manifest(path)
    manifest["optimizer"]["param_groups"][0]["lr"] = "fast"
    _write_manifest(path, manifest)
    _refused(tmp_path, "'lr' is 'fast' in the checkpoint")


def test_a_manifest_without_the_optimizer_tensor_index_still_loads(tmp_path):
    # Manifests written before ``optimizer.tensors`` existed: the keys come from the file index.
    torch.manual_seed(0)
    model, optimizer = checkpoint_model(bias=True)
    checkpoint_train_step(model, optimizer, 1)
    path = save_checkpoint(tmp_path, model, optimizer, step=1)
    manifest = _manifest(path)
    del manifest["optimizer"]["tensors"]
    _write_manifest(path, manifest)
    want = checkpoint_train_step(model, optimizer, 2)
    restored, restored_opt = checkpoint_model(bias=True)
    load_checkpoint(tmp_path, restored, restored_opt)
    assert checkpoint_train_step(restored, restored_opt, 2) == want


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"step": True}, "step must be an int"),
        ({"step": -1}, "step must be an int"),
        ({"step": 1, "keep": 0}, "keep must be an int >= 1"),
        ({"step": 1, "extra": {"x": object()}}, "extra must be JSON-serialisable"),
    ],
)
def test_bad_save_arguments_are_refused_before_writing(tmp_path, arguments, match):
    model, _ = checkpoint_model()
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path, model, **arguments)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ------------------------------------------------------------------ hostile files


@pytest.mark.parametrize("fname", ["model.safetensors", "experts-rank0.safetensors", "manifest.json"])
def test_a_truncated_file_is_refused(tmp_path, fname):
    path = _saved(tmp_path)
    raw = (path / fname).read_bytes()
    (path / fname).write_bytes(raw[: len(raw) // 2])
    _refused(tmp_path, fname)


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"format": "flexmoe-checkpoint"}', "\ud800", '{"a": NaN}'],
    ids=["garbage", "list", "incomplete", "bad-unicode", "nan"],
)
def test_a_manifest_that_is_not_a_manifest_is_refused(tmp_path, text):
    path = _saved(tmp_path)
    (path / "manifest.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    _refused(tmp_path, "manifest")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("step", "1"),
        ("step", -1),
        ("step", True),
        ("step", 1.5),
        ("world_size", 0),
        ("files", ["model.safetensors"]),
        ("layers", None),
        ("extra", []),
        ("optimizer", "adamw"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_refused(tmp_path, field, value):
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest[field] = value
    _write_manifest(path, manifest)
    _refused(tmp_path, field)


def test_duplicate_keys_in_the_manifest_are_refused(tmp_path):
    path = _saved(tmp_path)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text.replace('"step": 1', '"step": 1, "step": 2', 1))
    _refused(tmp_path, "duplicate.*step")


def test_duplicate_keys_in_a_safetensors_header_are_refused(tmp_path):
    path = _saved(tmp_path)
    file = path / "model.safetensors"
    header, data = _read_raw(file)
    entry = json.dumps(header["0.bias"])
    text = json.dumps(header).replace('"0.bias": ', f'"0.bias": {entry}, "0.bias": ', 1)
    _write_raw(file, text, data)
    _refused(tmp_path, "model.safetensors")


def test_huge_claimed_shapes_are_refused_quickly(tmp_path):
    path = _saved(tmp_path)
    file = path / "model.safetensors"
    header, data = _read_raw(file)
    header["0.weight"]["shape"] = [2**40, 2**40]
    _write_raw(file, header, data)
    _refused(tmp_path, "model.safetensors|0.weight")


def test_an_unknown_dtype_is_refused(tmp_path):
    path = _saved(tmp_path)
    file = path / "model.safetensors"
    header, data = _read_raw(file)
    header["0.bias"]["dtype"] = "F32X"
    _write_raw(file, header, data)
    _refused(tmp_path, "unknown dtype 'F32X'")


def test_a_huge_claimed_header_is_refused(tmp_path):
    path = _saved(tmp_path)
    file = path / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
    _refused(tmp_path, "model.safetensors")


def test_a_missing_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    os.remove(path / "experts-rank0.safetensors")
    _refused(tmp_path, "experts-rank0.safetensors")


def test_a_checkpoint_of_another_model_config_is_refused(tmp_path):
    _saved(tmp_path)
    wider = nn.Sequential(nn.Linear(16, 32), flexmoe.MoELayer(32, 8, 4, 2, bias=True))
    with pytest.raises(CheckpointError, match="dim is 16 in the checkpoint but 32"):
        load_checkpoint(tmp_path, wider)
    no_bias, _ = checkpoint_model(bias=False)
    with pytest.raises(CheckpointError, match="bias is True in the checkpoint but False"):
        load_checkpoint(tmp_path, no_bias)
    other_dense = nn.Sequential(nn.Linear(16, 16, bias=False), flexmoe.MoELayer(16, 8, 4, 2, bias=True))
    with pytest.raises(CheckpointError, match=r"0\.bias"):
        load_checkpoint(tmp_path, other_dense)
    half, _ = checkpoint_model(bias=True)
    half.to(torch.float64)
    with pytest.raises(CheckpointError, match=r"0\.weight.*float32.*float64"):
        load_checkpoint(tmp_path, half)


# ------------------------------------------------------------------ on two ranks


def load_missing_expert(rank: int, world: int, path: str) -> str:
    """Load a checkpoint that lacks expert 3 on ``world`` ranks; returns this rank's error."""
    model, optimizer = checkpoint_model(bias=True, group=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_checkpoint(path, model, optimizer)
    except CheckpointError as error:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return str(error)
    return "loaded"


def test_every_rank_refuses_a_checkpoint_missing_another_ranks_expert(rank_pools, tmp_path):
    # Expert 3 lives on rank 1; rank 0 must not load its half and carry on alone.
    path = _saved(tmp_path)
    _edit_tensors(path, lambda tensors: tensors.pop("1.experts.w_in.e3", None))
    errors = rank_pools.run(load_missing_expert, 2, str(tmp_path))
    assert all("1.experts.w_in.e3" in e for e in errors), errors
