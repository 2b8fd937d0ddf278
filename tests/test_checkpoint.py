"""Checkpoints: exact round trips (weights and optimizer state), re-sharding across world sizes,
atomic saves that an interruption cannot corrupt, clear refusals of mismatched models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import flexmoe
from flexmoe.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

from .parallel_workers import checkpoint_model, checkpoint_reshard_step, checkpoint_train_step


def test_round_trip_resumes_training_exactly(tmp_path):
    torch.manual_seed(0)
    model, optimizer = checkpoint_model(bias=True)
    checkpoint_train_step(model, optimizer, 1)
    save_checkpoint(tmp_path, model, optimizer, step=1, extra={"note": "hi"})
    uninterrupted = [checkpoint_train_step(model, optimizer, s) for s in (2, 3)]

    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    restored, restored_opt = checkpoint_model(bias=True)
    manifest = load_checkpoint(tmp_path, restored, restored_opt)
    assert manifest["step"] == 1 and manifest["extra"] == {"note": "hi"}
    resumed = [checkpoint_train_step(restored, restored_opt, s) for s in (2, 3)]
    assert resumed == uninterrupted
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_experts_are_stored_per_expert_with_a_manifest(tmp_path):
    model, optimizer = checkpoint_model()
    checkpoint_train_step(model, optimizer, 1)
    path = save_checkpoint(tmp_path, model, optimizer, step=7)
    assert path.name == "step-000007" and latest_checkpoint(tmp_path) == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["layers"]["1"]["num_experts"] == 4
    keys = manifest["files"]["experts-rank0.safetensors"]
    assert "1.experts.w_in.e3" in keys and "optim/1.experts.w_in/exp_avg.e3" in keys
    assert "1.experts.w_in" not in manifest["files"]["model.safetensors"]


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer = checkpoint_model()
    save_checkpoint(tmp_path, model, optimizer, step=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint_train_step(model, optimizer, 1)

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def dies_midway(tensors, filename, *args, **kwargs):
        if filename.endswith("model.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"half a file")  # the process dies while writing
            raise KeyboardInterrupt("killed")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, optimizer, step=2)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    assert latest_checkpoint(tmp_path).name == "step-000001"
    fresh, fresh_opt = checkpoint_model()
    assert load_checkpoint(tmp_path, fresh, fresh_opt)["step"] == 1
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # The next save of that step cleans up the partial directory and completes.
    save_checkpoint(tmp_path, model, optimizer, step=2)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not list(tmp_path.glob("*.partial"))


def test_keeps_the_newest_checkpoints(tmp_path):
    model, optimizer = checkpoint_model()
    for step in range(4):
        save_checkpoint(tmp_path, model, optimizer, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]


def test_mismatched_model_is_refused(tmp_path):
    model, _ = checkpoint_model()
    save_checkpoint(tmp_path, model, step=0)
    other = nn.Sequential(nn.Linear(16, 16), flexmoe.MoELayer(16, 8, 8, 2))
    with pytest.raises(CheckpointError, match="MoE layer '1': num_experts is 4 in the checkpoint but 8"):
        load_checkpoint(tmp_path, other)
    wider = nn.Sequential(nn.Linear(16, 32), flexmoe.MoELayer(16, 8, 4, 2))
    with pytest.raises(CheckpointError, match=r"'0.weight': dtype and shape are float32 \[16, 16\]"):
        load_checkpoint(tmp_path, wider)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "nowhere", model)


def test_reshards_between_world_sizes(rank_pools, tmp_path):
    # 1 device -> 2 ranks (2 experts each) -> 4 ranks (1 expert each) -> 1 device, training
    # one step at each stage (weights and AdamW state); every stage matches one device.
    torch.manual_seed(0)
    reference, reference_opt = checkpoint_model(num_experts=4)
    save_checkpoint(tmp_path / "w1", reference, reference_opt, step=0)
    losses = [checkpoint_train_step(reference, reference_opt, 10 + s) for s in range(2)]
    got = rank_pools.run(checkpoint_reshard_step, 2, str(tmp_path / "w1"), str(tmp_path / "w2"), 10)
    assert got[0] == pytest.approx(losses[0], rel=1e-5)
    got = rank_pools.run(checkpoint_reshard_step, 4, str(tmp_path / "w2"), str(tmp_path / "w4"), 11)
    assert got[0] == pytest.approx(losses[1], rel=1e-5)
    final, final_opt = checkpoint_model(num_experts=4)
    assert load_checkpoint(tmp_path / "w4", final, final_opt)["world_size"] == 4
    for (name, a), b in zip(reference.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_reshards_sharded_experts(rank_pools, tmp_path):
    # 2 experts with biases on 4 ranks: each expert's hidden units split 2 ways (b_out on shard 0).
    torch.manual_seed(0)
    reference, reference_opt = checkpoint_model(num_experts=2, bias=True)
    checkpoint_train_step(reference, reference_opt, 9)  # non-zero AdamW state to carry over
    save_checkpoint(tmp_path / "w1", reference, reference_opt, step=0)
    loss = checkpoint_train_step(reference, reference_opt, 10)
    args = (str(tmp_path / "w1"), str(tmp_path / "w4"), 10, 2, True)
    assert rank_pools.run(checkpoint_reshard_step, 4, *args)[0] == pytest.approx(loss, rel=1e-5)
    final, final_opt = checkpoint_model(num_experts=2, bias=True)
    load_checkpoint(tmp_path / "w4", final, final_opt)
    for (name, a), b in zip(reference.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for p_ref, p_new in zip(reference.parameters(), final.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(final_opt.state[p_new][key], reference_opt.state[p_ref][key])


def test_top_p_and_zero_expert_layers_round_trip_and_reshard(rank_pools, tmp_path):
    # Top-p routing, skip and constant zero experts, an aux-loss-free selection bias: 1 device
    # -> 2 ranks -> 1 device, one training step per stage; the zero constants, the bias and
    # the AdamW state come back as the single device has them.
    torch.manual_seed(0)
    reference, reference_opt = checkpoint_model(adaptive=True)
    checkpoint_train_step(reference, reference_opt, 9)
    layer = reference[1]
    assert layer.zero_constants is not None and bool(layer.zero_constants.abs().sum() > 0)
    assert bool(layer.router.expert_bias_E.abs().sum() > 0)  # moved by the update rule
    save_checkpoint(tmp_path / "w1", reference, reference_opt, step=0)
    loss = checkpoint_train_step(reference, reference_opt, 10)
    args = (str(tmp_path / "w1"), str(tmp_path / "w2"), 10, 4, False, True)
    assert rank_pools.run(checkpoint_reshard_step, 2, *args)[0] == pytest.approx(loss, rel=1e-5)
    torch.manual_seed(5)
    final, final_opt = checkpoint_model(adaptive=True)
    assert load_checkpoint(tmp_path / "w2", final, final_opt)["world_size"] == 2
    for (name, a), b in zip(reference.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert "1.zero_constants" in final.state_dict() and "1.router.expert_bias_E" in final.state_dict()
    for p_ref, p_new in zip(reference.parameters(), final.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(final_opt.state[p_new][key], reference_opt.state[p_ref][key])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_converted_transformers_model_round_trips_through_a_checkpoint(tmp_path, model_type):
    # A converted model's experts go out per expert and come back into another converted
    # model of the same config; reverted, it is the original transformers model.
    pytest.importorskip("transformers", minversion="5.0")
    import flexmoe.hf as hf

    from .hf_tiny import VOCAB, tiny_model

    original = tiny_model(model_type, seed=0)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(tokens).logits
    hf.convert(original)
    save_checkpoint(tmp_path, original, step=0)
    # Experts are stored once, per expert under flexmoe's names, not again under transformers'.
    stored = read_safetensors_keys(latest_checkpoint(tmp_path) / "model.safetensors")
    assert not any("gate_up_proj" in key or "down_proj" in key for key in stored), stored

    other = tiny_model(model_type, seed=1)  # other weights, same shapes
    hf.convert(other)
    load_checkpoint(tmp_path, other)
    hf.revert(other)
    assert not any(isinstance(m, flexmoe.MoELayer) for m in other.modules())
    with torch.no_grad():
        torch.testing.assert_close(other(tokens).logits, want, rtol=0, atol=0)


def read_safetensors_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())
