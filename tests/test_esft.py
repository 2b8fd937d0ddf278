"""Expert-specialized fine-tuning: the expert choice against a slow reference, training only the
chosen experts, and the adapter files.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import MoELayer
from flexmoe.adapters import (
    ESFTAdapter,
    ESFTExperts,
    esft_prepare,
    esft_scores,
    esft_select,
    load_esft_adapter,
    merge_esft_adapter,
    remove_weave,
    save_esft_adapter,
)
from flexmoe.adapters.esft import select_by_share


def reference_select(scores: list[float], threshold: float) -> tuple[int, ...]:
    """Walk the experts from the largest share down (lower id first on ties) until the shares reach ``p``."""
    total = sum(scores)
    if total <= 0:
        return ()
    order = sorted(range(len(scores)), key=lambda e: (-scores[e] / total, e))
    chosen, covered = [], 0.0
    for e in order:
        chosen.append(e)
        covered += scores[e] / total
        if covered >= threshold:
            break
    return tuple(sorted(chosen))


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=12),
    st.floats(0.01, 1.0),
)
@settings(max_examples=200, deadline=None)
def test_selection_takes_the_fewest_experts_reaching_the_threshold(
    counts: list[int], threshold: float
) -> None:
    scores = [float(c) for c in counts]
    chosen = select_by_share(torch.tensor(scores), threshold)
    assert chosen == reference_select(scores, threshold)
    if chosen:  # the fewest: dropping the weakest chosen expert falls short
        shares = [s / sum(scores) for s in scores]
        assert sum(shares[e] for e in chosen) >= threshold - 1e-12
        weakest = min(chosen, key=lambda e: (shares[e], -e))
        assert sum(shares[e] for e in chosen if e != weakest) < threshold


def reference_scores(layer: MoELayer, batches: list[torch.Tensor], score: str) -> list[float]:
    """Each expert's routing mass, one routed (token, choice) pair at a time."""
    E = layer.config.num_experts
    totals = [0.0] * E
    with torch.no_grad():
        for x in batches:
            route = layer.router(
                x.reshape(-1, layer.config.dim), layer.config.top_k, layer.config.router.top_p
            )
            for t in range(route.expert_ids_TK.shape[0]):
                for k in range(route.expert_ids_TK.shape[1]):
                    e = int(route.expert_ids_TK[t, k])
                    if e < E and (route.valid_TK is None or bool(route.valid_TK[t, k])):
                        totals[e] += float(route.weights_TK[t, k]) if score == "gate" else 1.0
    return totals


@given(
    E=st.integers(2, 8),
    k=st.integers(1, 3),
    top_p=st.sampled_from([None, 0.6]),
    score=st.sampled_from(["gate", "token"]),
    threshold=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_esft_select_matches_the_reference(E, k, top_p, score, threshold, seed) -> None:
    torch.manual_seed(seed)
    k = min(k, E)
    layer = MoELayer(8, 8, E, top_k=k)
    layer.set_routing(top_p=top_p)
    batches = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    expected = reference_scores(layer, batches, score)
    totals = esft_scores(layer, batches, score)
    assert list(totals) == ["experts"]
    torch.testing.assert_close(totals["experts"], torch.tensor(expected, dtype=torch.float64))
    chosen = esft_select(layer, batches, threshold, score)["experts"]
    assert chosen == select_by_share(torch.tensor(expected, dtype=torch.float64), threshold)


def test_only_the_chosen_experts_train() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 8, top_k=2, bias=True)
    x = torch.randn(4, 6, 16)
    before = copy.deepcopy(layer.state_dict())
    selection = esft_select(layer, [x], threshold=0.5)
    chosen = selection["experts"]
    assert 0 < len(chosen) < 8
    adapter = esft_prepare(layer, selection)
    assert [p for p in layer.parameters() if p.requires_grad] == []
    assert [p.shape[0] for p in adapter.parameters()] == [len(chosen)] * 4
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        (layer(x) - x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in layer.state_dict().items():  # the base, router included, is untouched
        assert torch.equal(value, before[name]), name
    trained = adapter.layers["experts"]
    assert not torch.equal(trained.w_in, before["experts.w_in"][list(chosen)])
    remove_weave(layer)
    merge_esft_adapter(layer, adapter)
    changed = [e for e in range(8) if not torch.equal(layer.experts.w_in[e], before["experts.w_in"][e])]
    assert tuple(changed) == chosen


def test_prepared_model_computes_the_merged_model_with_its_gradients() -> None:
    torch.manual_seed(1)
    layer = MoELayer(16, 24, 8, top_k=3, activation="geglu")
    x = torch.randn(3, 5, 16)
    adapter = esft_prepare(layer, {"experts": [1, 4, 6]})
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    merged = copy.deepcopy(layer)
    remove_weave(merged)
    merge_esft_adapter(merged, adapter)
    merged.experts.w_in.requires_grad_(True)
    grad_y = torch.randn_like(x)
    (layer(x) * grad_y).sum().backward()
    y = merged(x)
    (y * grad_y).sum().backward()
    torch.testing.assert_close(layer(x), y)
    trained = adapter.layers["experts"]
    torch.testing.assert_close(trained.w_in.grad, merged.experts.w_in.grad[[1, 4, 6]])


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    torch.manual_seed(2)
    layer = MoELayer(8, 12, 6, top_k=2, bias=True)
    adapter = esft_prepare(layer, {"experts": [0, 5]}, score="token", threshold=0.7)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    save_esft_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / "esft_config.json").read_text())
    assert config["experts"] == {"experts": [0, 5]} and config["score"] == "token"
    loaded = load_esft_adapter(tmp_path)
    assert loaded.layers["experts"].expert_ids == (0, 5)
    for name, t in adapter.layers["experts"].tensors().items():
        assert torch.equal(loaded.layers["experts"].tensors()[name], t.detach()), name
    assert (loaded.score, loaded.threshold) == ("token", 0.7)


def test_bad_adapters_and_selections_are_refused(tmp_path) -> None:
    layer = MoELayer(8, 12, 6, top_k=2)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        esft_select(layer, [torch.randn(4, 8)], threshold=0.0)
    with pytest.raises(ValueError, match="score must be 'gate' or 'token'"):
        esft_select(layer, [torch.randn(4, 8)], threshold=0.5, score="mass")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"selection: \['moe.experts'\] are not experts paths"):
        esft_prepare(copy.deepcopy(layer), {"moe.experts": [0]})
    wrong = ESFTAdapter({"experts": ESFTExperts((1,), torch.zeros(1, 24, 8), torch.zeros(1, 8, 6))})
    with pytest.raises(ValueError, match=r"experts.w_out has shape \(1, 8, 6\), expected \(1, 8, 12\)"):
        merge_esft_adapter(layer, wrong)
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "esft_config.json").write_text('{"format": "peft"}')
    with pytest.raises(ValueError, match="is not a flexmoe ESFT adapter"):
        load_esft_adapter(tmp_path / "other")
