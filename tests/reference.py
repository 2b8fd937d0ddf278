"""A slow, plainly written Mixture-of-Experts: the oracle every fast path is tested against.

Nothing here calls flexmoe's routing, dispatch or expert code. It reads only the layer's
config and its parameters (by name), copies them (by default to float64), and computes
the layer's output one token and one choice at a time, following the documented rules:

1. routing: softmax / sigmoid / cosine scores per token; a selection bias added to the
   scores for the *choice* only; group-limited selection (group score = max member, or
   the sum of the two best members for the sigmoid router); top-k by score, ties to the
   lower expert index; choice ``k`` is the ``k``-th best expert; with ``top_p`` a token
   keeps its first choices while the probability mass before them is below ``top_p``
   (at least ``min_k``); weights are the kept choices' scores, renormalised to sum to
   one when ``normalize_weights`` and the token kept more than one (or any number,
   with ``normalize_single``), then times ``routed_scaling_factor``;
2. capacity, with ``A`` the routed assignments (``T*K`` without top-p): ``cf > 0``:
   ``ceil(cf*A/E)``; ``cf < 0``: ``min(max routed load, ceil(|cf|*A/E))``; ``cf == 0``:
   no drop. Default priority: all first choices before second choices, earlier tokens
   first within one choice; ``batch_prioritized``: higher routing weight first, ties by
   the default order;
3. output: the weighted sum of the kept choices' expert FFNs, plus the shared FFN; a
   choice of a zero-computation expert (id ``E + j``, never dropped) adds its weight
   times nothing (skip), the token (copy) or a learned vector (constant).

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
ExpertFn = Callable[[int, Tensor], Tensor]


# ----------------------------------------------------------------------------- params
def reference_params(layer: nn.Module, dtype: torch.dtype = torch.float64) -> Params:
    """Leaf copies (requiring grad) of the layer's parameters and its selection bias, by name."""
    params: Params = {}
    for name, p in layer.named_parameters():
        params[name] = p.detach().to(dtype).clone().requires_grad_(True)
    bias = getattr(layer.router, "expert_bias_E", None)
    if bias is not None:
        params["router.expert_bias_E"] = bias.detach().to(dtype).clone()
    return params


# ----------------------------------------------------------------------------- math
def sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def softmax(v: Tensor) -> Tensor:
    e = torch.exp(v - v.max().detach())
    return e / e.sum()


def activation_fn(name: str, h: Tensor) -> Tensor:
    """``act(h)``; gated activations read ``h`` as ``[gate | up]``."""
    if name in ("swiglu", "geglu"):
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        return activation_fn("silu" if name == "swiglu" else "gelu", gate) * up
    if name == "relu":
        return h * (h > 0).to(h.dtype)
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "silu":
        return h * sigmoid(h)
    raise ValueError(name)


def ffn(
    x_D: Tensor, w_in: Tensor, w_out: Tensor, b_in: Tensor | None, b_out: Tensor | None, act: str
) -> Tensor:
    """One FFN on one token: ``w_out @ act(w_in @ x + b_in) + b_out``."""
    h = w_in @ x_D
    if b_in is not None:
        h = h + b_in
    y = w_out @ activation_fn(act, h)
    if b_out is not None:
        y = y + b_out
    return y


# ----------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """Per-token choices: ``expert_ids[t][k]`` and the differentiable ``weights[t][k]``."""

    expert_ids: list[list[int]]
    weights: list[list[Tensor]]
    probs: list[Tensor]
    logits: list[Tensor]
    # smallest gap between a chosen and an unchosen score (or group score): when it is
    # tiny, fp32 and fp64 may legitimately choose differently.
    choice_margin: float


def _scores(config, params: Params, x_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits_E, scores_E, probs_E)`` for one token."""
    kind = config.router.kind
    if kind == "cosine":
        h = params["router.proj"] @ x_D
        h = h / torch.sqrt((h * h).sum())
        emb = params["router.expert_embeddings"]
        emb = emb / torch.sqrt((emb * emb).sum(dim=1, keepdim=True))
        temperature = torch.clamp(torch.exp(params["router.log_temperature"]), min=0.01)
        logits = (emb @ h) / temperature
    else:
        logits = params["router.weight"] @ x_D
    if kind == "sigmoid":
        scores = sigmoid(logits)
        return logits, scores, scores / scores.sum()
    probs = softmax(logits)
    return logits, probs, probs


NEAR_TIE = 1e-5  # scores closer than this may be ordered either way by fp32 arithmetic


def _check_near_tie(
    other: list[int], chosen: list[int], values: list[float], eligible: list[int], t: int
) -> list[int]:
    """``other`` (another implementation's top-k) if it differs from ``chosen`` only by near ties."""
    assert len(set(other)) == len(chosen) and set(other) <= set(eligible), (t, other, chosen)
    assert _near(values, chosen, other) and _ordered(values, other), (t, other, chosen)
    return list(other)


def _ordered(values: list[float], choice: list[int]) -> bool:
    """Whether ``choice`` is best-first up to ``NEAR_TIE`` (another order of near-tied choices)."""
    return all(values[a] >= values[b] - NEAR_TIE for a, b in itertools.pairwise(choice))


def _near(values: list[float], mine: list[int], theirs: list[int]) -> bool:
    """Whether two selections have the same sorted values up to ``NEAR_TIE``."""
    a = sorted((values[i] for i in mine), reverse=True)
    b = sorted((values[i] for i in theirs), reverse=True)
    return len(a) == len(b) and all(abs(x - y) <= NEAR_TIE for x, y in zip(a, b, strict=True))


def _check_near_tie_groups(
    other: list[int], values: list[float], group_scores: list[float], groups: list[int], size: int, t: int
) -> list[int]:
    """``other`` if some near-tied choice of groups contains it as a near-tied top-k.

    Every set of ``len(groups)`` groups holding ``other``'s experts is tried: the one the
    other implementation took may differ from ``groups`` by near-tied group scores, and
    then its top-k is compared with the best of that set's experts.
    """
    needed = {e // size for e in other}
    for candidate in itertools.combinations(range(len(group_scores)), len(groups)):
        if not needed <= set(candidate) or not _near(group_scores, groups, list(candidate)):
            continue
        eligible = [e for e in range(len(values)) if e // size in candidate]
        best, _ = _best(values, eligible, len(other))
        if len(set(other)) == len(other) and _near(values, best, other) and _ordered(values, other):
            return list(other)
    raise AssertionError((t, other, groups))


def _best(values: list[float], candidates: list[int], n: int) -> tuple[list[int], float]:
    """The ``n`` best candidates by value (ties to the lower index), and the gap to the next."""
    ranked = sorted(candidates, key=lambda i: (-values[i], i))
    gap = math.inf if n >= len(ranked) else values[ranked[n - 1]] - values[ranked[n]]
    return ranked[:n], gap


def _top_p_count(
    probs: list[float], top_p: float, min_k: int, other: int | None, t: int
) -> tuple[int, float]:
    """How many of the ordered choices a token keeps under ``top_p``, and the decision margin.

    ``other``: another implementation's count, taken where the two differ only at
    boundaries whose mass before them is within ``NEAR_TIE`` of ``top_p``.
    """
    before = [sum(probs[:k]) for k in range(len(probs))]
    floor = min(min_k, len(probs))
    count = max(floor, sum(1 for b in before if b < top_p))
    deciding = [abs(b - top_p) for b in before[floor:]]
    margin = min(deciding, default=math.inf)
    if other is not None and other != count:
        low, high = sorted((count, other))
        assert other >= floor and all(abs(before[k] - top_p) <= NEAR_TIE for k in range(low, high)), (
            t,
            other,
            count,
            before,
        )
        return other, math.inf
    return count, margin


def route(
    config,
    params: Params,
    x_TD: Tensor,
    top_k: int,
    near_tie_choice: list[list[int]] | None = None,
    top_p: float | None = None,
    near_tie_counts: list[int] | None = None,
) -> Routing:
    """Route every token with plain per-token code.

    ``near_tie_choice``: another implementation's choice for each token, taken instead of
    this one's where the two differ only between near-tied scores (``NEAR_TIE``): both are
    then correct top-k choices, and the rest of the layer is checked on the one it made.
    A choice that is not such a tie raises ``AssertionError``. ``near_tie_counts``: the
    same for the number of choices each token keeps under ``top_p``.
    """
    rcfg = config.router
    E = config.num_choices  # the routed experts, then the zero-computation ones
    ids_all, weights_all, probs_all, logits_all = [], [], [], []
    margin = math.inf
    for t in range(x_TD.shape[0]):
        logits, scores, probs = _scores(config, params, x_TD[t])
        choice = [float(s) for s in scores.detach()]
        if rcfg.selection_bias:
            choice = [c + float(b) for c, b in zip(choice, params["router.expert_bias_E"], strict=True)]
        eligible = list(range(E))
        group_gap = math.inf
        if rcfg.num_groups > 1:
            size = E // rcfg.num_groups
            group_scores = []
            for g in range(rcfg.num_groups):
                members = sorted(choice[g * size : (g + 1) * size], reverse=True)
                group_scores.append(sum(members[:2]) if rcfg.kind == "sigmoid" else members[0])
            groups, group_gap = _best(group_scores, list(range(rcfg.num_groups)), rcfg.topk_groups)
            eligible = [e for e in range(E) if e // size in groups]
        chosen, gap = _best(choice, eligible, top_k)
        if near_tie_choice is not None and near_tie_choice[t] != chosen:
            if rcfg.num_groups > 1:
                chosen = _check_near_tie_groups(near_tie_choice[t], choice, group_scores, groups, size, t)
            else:
                chosen = _check_near_tie(near_tie_choice[t], chosen, choice, eligible, t)
            gap = group_gap = math.inf  # a tie taken the other implementation's way: no margin of this one
        margin = min(margin, gap, group_gap)
        if top_p is not None and top_k > 1:
            other = None if near_tie_counts is None else near_tie_counts[t]
            chosen_probs = [float(probs[e]) for e in chosen]
            count, top_p_margin = _top_p_count(chosen_probs, top_p, rcfg.min_k, other, t)
            chosen = chosen[:count]
            margin = min(margin, top_p_margin)
        weights = [scores[e] for e in chosen]
        if rcfg.normalize_weights and (len(chosen) > 1 or rcfg.normalize_single):
            total = sum(weights)
            weights = [w / total for w in weights]
        weights = [w * rcfg.routed_scaling_factor for w in weights]
        ids_all.append(chosen)
        weights_all.append(weights)
        probs_all.append(probs)
        logits_all.append(logits)
    return Routing(ids_all, weights_all, probs_all, logits_all, margin)


# ----------------------------------------------------------------------------- capacity
def capacity(capacity_factor: float, T: int, K: int, E: int, loads: list[int]) -> int | None:
    """Per-expert capacity, exactly (rational arithmetic), or ``None`` when dropless."""
    if capacity_factor == 0:
        return None
    cap = math.ceil(abs(Fraction(capacity_factor)) * T * K / E)
    if capacity_factor > 0:
        return cap
    return min(max(loads), cap)


def kept_assignments(
    expert_ids: list[list[int]],
    weights: list[list[float]],
    num_experts: int,
    capacity_factor: float,
    batch_prioritized: bool,
    near_tie_kept: set[tuple[int, int]] | None = None,
) -> tuple[set[tuple[int, int]], int | None, float]:
    """The kept ``(t, k)`` assignments, the capacity, and the priority margin.

    The margin is the smallest gap of routing weights between the last kept and the first
    dropped assignment of an overflowing expert (``inf`` if none matters): with batch
    priority a tiny gap may legitimately order differently in fp32. An exact tie here
    counts too: fp64 may tie what fp32 does not (two tokens with the same direction and
    different norms under the cosine router, say).

    ``near_tie_kept``: another implementation's kept set, taken instead of this one's
    where the two differ only by the order of near-tied weights (``NEAR_TIE``) under batch
    priority; any other difference raises ``AssertionError``.
    """
    T = len(expert_ids)
    K = max((len(row) for row in expert_ids), default=0)
    loads = [0] * num_experts
    for row in expert_ids:
        for e in row:
            if e < num_experts:  # a zero-computation expert (id >= E) is not dispatched
                loads[e] += 1
    cap = capacity(capacity_factor, sum(loads), 1, num_experts, loads)
    order = [
        (t, k)
        for k in range(K)
        for t in range(T)
        if k < len(expert_ids[t]) and expert_ids[t][k] < num_experts
    ]
    if batch_prioritized:
        order = sorted(order, key=lambda tk: -weights[tk[0]][tk[1]])  # stable: ties keep default order
    kept: set[tuple[int, int]] = set()
    used = [0] * num_experts
    last_kept: dict[int, float] = {}
    margin = math.inf
    for t, k in order:
        e = expert_ids[t][k]
        if cap is None or used[e] < cap:
            used[e] += 1
            kept.add((t, k))
            last_kept[e] = weights[t][k]
        elif batch_prioritized and e in last_kept:
            margin = min(margin, abs(last_kept[e] - weights[t][k]))
    if near_tie_kept is not None and near_tie_kept != kept:
        _check_near_tie_kept(near_tie_kept, kept, expert_ids, weights, batch_prioritized)
        return set(near_tie_kept), cap, math.inf
    return kept, cap, margin


def _check_near_tie_kept(
    other: set[tuple[int, int]],
    kept: set[tuple[int, int]],
    expert_ids: list[list[int]],
    weights: list[list[float]],
    batch_prioritized: bool,
) -> None:
    """Assert ``other`` keeps as many per expert as ``kept`` and never a clearly lighter one."""
    assert batch_prioritized, ("the default priority has no ties", sorted(other ^ kept))
    slots = [(t, k) for t, row in enumerate(expert_ids) for k in range(len(row))]
    assert other <= set(slots), sorted(other - set(slots))
    for e in {expert_ids[t][k] for t, k in slots}:
        mine = [tk for tk in slots if expert_ids[tk[0]][tk[1]] == e]
        in_other = [weights[t][k] for t, k in mine if (t, k) in other]
        out_other = [weights[t][k] for t, k in mine if (t, k) not in other]
        assert len(in_other) == sum(tk in kept for tk in mine), (e, "kept count")
        if in_other and out_other:
            assert min(in_other) >= max(out_other) - NEAR_TIE, (e, min(in_other), max(out_other))


# ----------------------------------------------------------------------------- layer
@dataclass
class ReferenceOutput:
    """The reference output and everything a test may want to check against."""

    y_TD: Tensor
    routing: Routing
    kept: set[tuple[int, int]]
    capacity: int | None
    tokens_per_expert: list[int]
    routed_per_expert: list[int]
    priority_margin: float

    @property
    def margin(self) -> float:
        """Smallest decision margin (choice or priority); tiny means fp32 may differ."""
        return min(self.routing.choice_margin, self.priority_margin)


def routed_expert(config, params: Params) -> ExpertFn:
    """The built-in grouped FFN expert ``e`` applied to one token."""
    act = config.experts.activation

    def apply(e: int, x_D: Tensor) -> Tensor:
        b_in = params.get("experts.b_in")
        b_out = params.get("experts.b_out")
        return ffn(
            x_D,
            params["experts.w_in"][e],
            params["experts.w_out"][e],
            None if b_in is None else b_in[e],
            None if b_out is None else b_out[e],
            act,
        )

    return apply


def shared_expert(config, params: Params, x_D: Tensor) -> Tensor:
    """The shared (always-on) FFN on one token, with its optional sigmoid gate."""
    y = ffn(
        x_D,
        params["shared_experts.w_in.weight"],
        params["shared_experts.w_out.weight"],
        params.get("shared_experts.w_in.bias"),
        params.get("shared_experts.w_out.bias"),
        config.experts.activation,
    )
    if "shared_experts.gate.weight" in params:
        y = y * sigmoid(params["shared_experts.gate.weight"][0] @ x_D)
    return y


def zero_expert(config, params: Params, j: int, x_D: Tensor) -> Tensor:
    """Zero-computation expert ``j`` on one token: nothing (skip), the token (copy), or its vector."""
    kinds = config.experts.zero_experts
    if kinds[j] == "skip":
        return torch.zeros_like(x_D)
    if kinds[j] == "copy":
        return x_D
    return params["zero_constants"][kinds[:j].count("constant")]


def reference_moe(
    config,
    params: Params,
    x: Tensor,
    *,
    top_k: int | None = None,
    capacity_factor: float | None = None,
    expert_fn: ExpertFn | None = None,
    near_tie_choice: list[list[int]] | None = None,
    near_tie_kept: set[tuple[int, int]] | None = None,
    top_p: float | None = None,
    near_tie_counts: list[int] | None = None,
) -> ReferenceOutput:
    """The MoE layer's output for ``x [..., D]``, one token and one choice at a time.

    ``near_tie_choice``, ``near_tie_counts``: see ``route``; ``near_tie_kept``: see
    ``kept_assignments``. ``top_p``: this call's (default: the router config's).
    """
    K = config.top_k if top_k is None else top_k
    cf = config.capacity.capacity_factor if capacity_factor is None else capacity_factor
    p = config.router.top_p if top_p is None else top_p
    E = config.num_experts
    x_TD = x.reshape(-1, config.dim)
    routing = route(config, params, x_TD, K, near_tie_choice, p, near_tie_counts)
    plain_weights = [[float(w.detach()) for w in row] for row in routing.weights]
    kept, cap, priority_margin = kept_assignments(
        routing.expert_ids, plain_weights, E, cf, config.capacity.batch_prioritized, near_tie_kept
    )
    expert = expert_fn or routed_expert(config, params)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(config.dim, dtype=x_TD.dtype)
        for k, e in enumerate(routing.expert_ids[t]):
            if e >= E:
                y = y + routing.weights[t][k] * zero_expert(config, params, e - E, x_TD[t])
            elif (t, k) in kept:
                y = y + routing.weights[t][k] * expert(e, x_TD[t])
        if config.experts.num_shared_experts > 0:
            y = y + shared_expert(config, params, x_TD[t])
        rows.append(y)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, config.dim)
    routed = [0] * E
    kept_counts = [0] * E
    for t, row in enumerate(routing.expert_ids):
        for k, e in enumerate(row):
            if e < E:
                routed[e] += 1
                kept_counts[e] += (t, k) in kept
    return ReferenceOutput(y_TD.reshape(x.shape), routing, kept, cap, kept_counts, routed, priority_margin)


def reference_load_balance_loss(routing: Routing, num_experts: int) -> Tensor:
    """``E * sum_i f_i * P_i`` with plain sums (``f`` counts choices before any drop)."""
    T = len(routing.expert_ids)
    A = sum(len(row) for row in routing.expert_ids)
    total = 0.0
    for i in range(num_experts):
        f_i = sum(row.count(i) for row in routing.expert_ids) / A
        P_i = sum(p[i] for p in routing.probs) / T
        total = total + f_i * P_i
    return num_experts * total


def reference_z_loss(routing: Routing) -> Tensor:
    """``mean_t (log sum_i exp(logits_ti))^2``."""
    values = [torch.log(torch.exp(lg).sum()) ** 2 for lg in routing.logits]
    return sum(values) / len(values)


def reference_rerouting(
    loads: list[int],
    W: int,
    *,
    alpha: float = 1.0,
    min_chunk: int = 1,
    max_rows_per_rank: int | None = None,
    max_copies_per_rank: int | None = None,
    held: list[list[int]] | None = None,
) -> tuple[list[list[tuple[int, int, int]]], list[int], list[tuple[int, int]]]:
    """Least-loaded rerouting as algorithms.md states it, re-sorting the ranks for every chunk.

    Returns ``(intervals per expert, rows per rank, transfers)``; raises ``ValueError``
    when the hard bounds cannot hold. The layer's heap-based planner must agree exactly.
    ``held[p]``: replicas rank ``p`` holds (no transfer; they count towards its copies).
    """
    E = len(loads)
    El = E // W
    total = sum(loads)
    native = [sum(loads[p * El : (p + 1) * El]) for p in range(W)]
    limit = math.inf if max_rows_per_rank is None else max_rows_per_rank
    copy_limit = math.inf if max_copies_per_rank is None else max_copies_per_rank
    if total > W * limit:
        raise ValueError("max_rows_per_rank too small")
    cap = min(math.ceil(alpha * total / W), limit)
    pending, assigned = list(native), [0] * W
    copies: list[set[int]] = [set() for _ in range(W)]
    replicas = [set(h) for h in held] if held else [set() for _ in range(W)]
    intervals: list[list[tuple[int, int, int]]] = [[] for _ in range(E)]
    transfers: list[tuple[int, int]] = []

    def may_hold(p: int, e: int) -> bool:
        return e in copies[p] or e in replicas[p] or len(copies[p] | replicas[p]) < copy_limit

    def give(e: int, rank: int, start: int, size: int) -> None:
        intervals[e].append((rank, start, start + size))
        assigned[rank] += size
        if rank != e // El and e not in copies[rank]:
            copies[rank].add(e)
            if e not in replicas[rank]:
                transfers.append((e, rank))

    for e in sorted(range(E), key=lambda i: (-loads[i], i)):
        load, owner = loads[e], e // El
        pending[owner] -= load
        keep = int(min(load, max(cap - assigned[owner] - pending[owner], 0)))
        if keep or load == 0:
            give(e, owner, 0, keep)
        offset, remainder = keep, load - keep
        while remainder:
            order = sorted(
                (p for p in range(W) if p != owner and may_hold(p, e)),
                key=lambda p: (assigned[p] + pending[p], p),
            )
            for p in order:
                chunk = int(min(remainder, cap - assigned[p] - pending[p]))
                if chunk > 0 and (chunk >= min_chunk or chunk == remainder):
                    give(e, p, offset, chunk)
                    offset, remainder = offset + chunk, remainder - chunk
                    break
            else:
                break
        while remainder:
            candidates = [
                p for p in range(W) if assigned[p] + pending[p] < limit and (p == owner or may_hold(p, e))
            ]
            if not candidates:
                raise ValueError("bounds cannot hold")
            p = min(candidates, key=lambda q: (assigned[q] + pending[q], q != owner, q))
            chunk = int(min(remainder, limit - assigned[p] - pending[p]))
            give(e, p, offset, chunk)
            offset, remainder = offset + chunk, remainder - chunk
        merged: list[tuple[int, int, int]] = []
        for rank, start, stop in intervals[e]:
            if merged and merged[-1][0] == rank and merged[-1][2] == start:
                merged[-1] = (rank, merged[-1][1], stop)
            elif stop > start or not merged:
                merged.append((rank, start, stop))
        intervals[e] = merged
    return intervals, assigned, transfers
