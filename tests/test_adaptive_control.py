"""The mean-experts-per-token controller (the top-p rule against a plain reference, convergence on a
synthetic stream and in training, its state) and layer-wise routing schedules (values against a plain
piecewise reference, parsing errors, applied to real layers)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmoe import ExpertsPerTokenController, MoELayer, RouterConfig, RoutingSchedule
from flexmoe.layer import StepSchedule, parse_layer_schedule
from flexmoe.routing import top_p_update


def reference_update(p, measured, target, rate, low, high):
    new = p + rate * (target - measured)
    if new < low:
        return low
    if new > high:
        return high
    return new


@settings(max_examples=200)
@given(
    p=st.floats(0.05, 1.0),
    measured=st.floats(0.0, 8.0),
    target=st.floats(0.0, 8.0),
    rate=st.floats(0.0, 1.0),
    bounds=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
)
def test_top_p_update_is_the_clamped_integral_rule(p, measured, target, rate, bounds):
    low, high = bounds
    assert top_p_update(p, measured, target, rate, low, high) == reference_update(
        p, measured, target, rate, low, high
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(measured_k=-1.0), "measured_k must be a finite number >= 0"),
        (dict(rate=math.nan), "rate must be a finite number >= 0"),
        (dict(p_min=0.6, p_max=0.5), "p_min and p_max must satisfy"),
    ],
)
def test_top_p_update_refuses_bad_input(kwargs, message):
    args = dict(p=0.5, measured_k=1.0, target_k=1.5, rate=0.1, p_min=0.1, p_max=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        top_p_update(**args)


def _layers(n=2, top_k=4, top_p=0.9, seed=0):
    torch.manual_seed(seed)
    return [MoELayer(16, 32, 8, top_k=top_k, router=RouterConfig(top_p=top_p)) for _ in range(n)]


def _reference_experts_per_token(layer, x):
    """Mean experts per token under the layer's top-p, from its router's probabilities (plain loops)."""
    probs = torch.softmax(x.double() @ layer.router.weight.double().T, dim=1)
    p, k, min_k = layer.config.router.top_p, layer.config.top_k, layer.config.router.min_k
    counts = []
    for row in probs.tolist():
        best = sorted(row, reverse=True)[:k]
        before = [sum(best[:j]) for j in range(k)]  # the mass before each choice
        counts.append(max(min_k, sum(1 for b in before if b < p)))
    return sum(counts) / len(counts)


def test_the_controller_measures_each_layer_and_applies_the_rule():
    layers = _layers()
    controller = ExpertsPerTokenController(layers, target=1.5, rate=0.1)
    xs = [torch.randn(64, 16), torch.randn(48, 16)]
    before = controller.top_p
    for layer, x in zip(layers, xs, strict=True):
        layer(x)
    expected = [_reference_experts_per_token(layer, x) for layer, x in zip(layers, xs, strict=True)]
    assert controller.measured() == pytest.approx(expected)
    after = controller.step()
    assert after == pytest.approx(
        [reference_update(p, k, 1.5, 0.1, 0.05, 1.0) for p, k in zip(before, expected, strict=True)]
    )
    assert [layer.config.router.top_p for layer in layers] == after
    assert controller.measured() == [None, None]  # the counts start again
    assert controller.step() == after  # no forward since: nothing moves


def test_evaluation_calls_are_not_counted():
    (layer,) = _layers(1)
    controller = ExpertsPerTokenController(layer, target=1.5)
    layer.eval()
    layer(torch.randn(32, 16))
    assert controller.measured() == [None]


@pytest.mark.parametrize("target", [1.3, 2.0, 3.2])
def test_on_a_synthetic_stream_the_mean_converges_to_the_target(target):
    layers = _layers(2, seed=3)
    controller = ExpertsPerTokenController(layers, target=target, rate=0.05)
    generator = torch.Generator().manual_seed(7)
    late = []
    for step in range(300):
        for layer in layers:
            layer(torch.randn(128, 16, generator=generator))
        measured = controller.measured()
        controller.step()
        if step >= 200:
            late.append(measured)
    for i in range(2):
        mean = sum(m[i] for m in late) / len(late)
        assert abs(mean - target) < 0.05, (i, mean)


def test_in_training_the_controller_holds_the_target_while_the_router_learns():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, top_k=4, router=RouterConfig(top_p=0.95))
    head = torch.nn.Linear(16, 1)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)
    controller = ExpertsPerTokenController(layer, target=1.6, rate=0.05)
    controller.attach(optimizer)
    generator = torch.Generator().manual_seed(1)
    late = []
    for _ in range(250):
        x = torch.randn(96, 16, generator=generator)
        loss = (head(layer(x)).squeeze(-1) - x[:, 0]).square().mean() + layer.aux_loss
        loss.backward()
        late.append(controller.measured()[0])
        optimizer.step()  # the hook runs controller.step()
        optimizer.zero_grad()
    assert abs(sum(late[-80:]) / 80 - 1.6) < 0.06


def test_per_layer_targets_are_layer_budgets():
    layers = _layers(2, seed=5)
    controller = ExpertsPerTokenController(layers, target=[1.2, 2.5], rate=0.05)
    generator = torch.Generator().manual_seed(2)
    late = []
    for step in range(250):
        for layer in layers:
            layer(torch.randn(128, 16, generator=generator))
        if step >= 150:
            late.append(controller.measured())
        controller.step()
    assert [sum(m[i] for m in late) / len(late) for i in range(2)] == pytest.approx([1.2, 2.5], abs=0.05)
    with pytest.raises(
        ValueError, match=r"target must be a finite number >= 0 or 2 of them \(one per layer\)"
    ):
        ExpertsPerTokenController(layers, target=[1.5])


def test_with_zero_experts_the_controller_counts_only_routed_experts():
    torch.manual_seed(4)
    layer = MoELayer(16, 32, 8, top_k=4, router=RouterConfig(top_p=0.9), zero_experts=("skip", "copy"))
    controller = ExpertsPerTokenController(layer, target=1.4, rate=0.05)
    generator = torch.Generator().manual_seed(3)
    late = []
    for step in range(250):
        layer(torch.randn(128, 16, generator=generator))
        stats = layer.stats
        assert int(stats.routed_per_expert.sum()) == round(controller.measured()[0] * 128)  # routed only
        if step >= 150:
            late.append(controller.measured()[0])
        controller.step()
    assert int(stats.zero_expert_choices.sum()) > 0
    assert abs(sum(late) / len(late) - 1.4) < 0.05


def test_an_unreachable_target_rests_at_the_bound():
    (layer,) = _layers(1, top_p=0.5)
    controller = ExpertsPerTokenController(layer, target=4.0, rate=0.5, p_max=0.6)
    for _ in range(20):
        layer(torch.randn(64, 16))
        controller.step()
    assert controller.top_p == [0.6]


def test_the_state_round_trips_into_fresh_layers():
    layers = _layers()
    controller = ExpertsPerTokenController(layers, target=1.5, rate=0.2)
    for _ in range(3):
        for layer in layers:
            layer(torch.randn(32, 16))
        controller.step()
    state = controller.state_dict()
    fresh = _layers(seed=1)
    other = ExpertsPerTokenController(fresh, target=1.5, rate=0.2)
    other.load_state_dict(state)
    assert other.top_p == controller.top_p == [layer.config.router.top_p for layer in fresh]
    with pytest.raises(ValueError, match="expected 'top_p' with 2 values"):
        other.load_state_dict({"top_p": [0.5]})


def test_the_controller_refuses_layers_without_top_p_and_bad_settings():
    plain = MoELayer(16, 32, 8, top_k=2)
    with pytest.raises(ValueError, match="MoE layer 0 does not route with top-p"):
        ExpertsPerTokenController(plain, target=1.5)
    with pytest.raises(ValueError, match="rate must be a finite number > 0"):
        ExpertsPerTokenController(_layers(1), target=1.5, rate=0.0)
    with pytest.raises(ValueError, match="expected a model with MoELayers"):
        ExpertsPerTokenController(torch.nn.Linear(2, 2), target=1.5)
    layers = _layers(1)
    controller = ExpertsPerTokenController(layers, target=1.5)
    controller.remove()
    layers[0](torch.randn(8, 16))
    assert controller.measured() == [None]  # no hooks: nothing counted


# ------------------------------------------------------------------ schedules
def reference_value(start, end, begin, finish, step):
    if begin == finish:
        return start if step < begin else end
    if step <= begin:
        return start
    if step >= finish:
        return end
    return start + (end - start) * (step - begin) / (finish - begin)


@settings(max_examples=200)
@given(
    start=st.floats(-4, 4),
    end=st.floats(-4, 4),
    begin=st.integers(0, 50),
    length=st.integers(0, 50),
    step=st.integers(0, 120),
)
def test_a_step_schedule_is_the_piecewise_linear_reference(start, end, begin, length, step):
    schedule = StepSchedule(start, end, begin, begin + length)
    assert schedule.at(step) == pytest.approx(reference_value(start, end, begin, begin + length, step))
    (parsed,) = parse_layer_schedule(
        f"{start!r}->{end!r}@{begin}" + (f"..{begin + length}" if length else ""), 1
    )
    assert parsed.at(step) == pytest.approx(schedule.at(step))


def test_parsing_layer_schedules():
    assert [s.at(0) for s in parse_layer_schedule("2,1", 2)] == [2.0, 1.0]
    assert [s.at(5) for s in parse_layer_schedule("0.9->0.5@0..10", 3)] == [0.7, 0.7, 0.7]
    step = parse_layer_schedule("2->1@300", 1)[0]
    assert (step.at(299), step.at(300)) == (2.0, 1.0)
    assert str(step) == "2->1@300"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2,1,1", "top_k: expected 1 entry \\(every layer\\) or 2 \\(one per MoE layer\\), got 3"),
        ("2,x", "top_k: cannot read 'x'; expected a number, 'A->B@STEP' or 'A->B@START..END'"),
        ("2->1@10..5", "top_k: in '2->1@10..5' the end step must be >= the start step"),
        ("", "top_k: expected a comma-separated list"),
    ],
)
def test_bad_schedules_are_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        RoutingSchedule.parse(2, top_k=text)


def test_schedule_value_ranges_are_checked():
    with pytest.raises(ValueError, match="top_k: every value must be >= 1"):
        RoutingSchedule.parse(1, top_k="2->0@5")
    with pytest.raises(ValueError, match=r"top_p: every value must be in \(0, 1\]"):
        RoutingSchedule.parse(1, top_p="0.5->1.5@0..5")


def test_a_routing_schedule_sets_each_layer_per_step():
    torch.manual_seed(0)
    layers = [MoELayer(16, 32, 8, top_k=2) for _ in range(2)]
    schedule = RoutingSchedule.parse(2, top_k="2->1@3,3", top_p="1.0,0.9->0.5@0..4", capacity_factor="0,1.25")
    seen = []
    for step in range(1, 6):
        schedule.apply(layers, step)
        for layer in layers:
            layer(torch.randn(40, 16))
        seen.append(
            [(layer.stats.top_k, layer.config.router.top_p, layer.stats.capacity_factor) for layer in layers]
        )
    assert [s[0][0] for s in seen] == [2, 2, 1, 1, 1]  # layer 0: top-2, top-1 from step 3
    assert [s[1][0] for s in seen] == [3, 3, 3, 3, 3]
    assert [s[1][1] for s in seen] == pytest.approx([0.8, 0.7, 0.6, 0.5, 0.5])
    assert all(s[0][2] == 0.0 and s[1][2] == 1.25 for s in seen)
    assert layers[1].stats.mean_experts_per_token < 3  # top-p 0.5 takes fewer than 3
