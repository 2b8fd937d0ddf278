"""A ``"flexmoe"`` entry in ``transformers``' registry of experts implementations.

Legend: T tokens, D model dim, K top-k, N routed rows (T*K), E experts.

``transformers`` 5 lets a model choose how its experts module computes
``experts(hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K])``:
``experts_implementation="eager" | "batched_mm" | "grouped_mm" | ...``, per model or
per sub-config. ``register_experts_implementation()`` adds ``"flexmoe"``: flexmoe's
dispatch (a sort into expert-major rows, no one-hot) and expert kernels on the module's
own ``gate_up_proj`` / ``down_proj`` (and biases), while routing, shared experts and
everything else stay ``transformers``' code.

That is the lighter of the two integrations, and it serves every block whose experts
module uses ``@use_experts_implementation`` with a layout flexmoe computes, including
blocks whose router ``flexmoe.hf.convert`` refuses (PhiMoE's SparseMixer, Llama 4's
input scaling do not matter here). It cannot give what needs the router inside flexmoe:
expert parallelism over a process group, capacity factors, per-expert statistics,
aux-loss-free balancing. Experts modules whose layout flexmoe does not compute
(transposed, interleaved, a custom gate, a post-expert norm) and ``transformers``' own
expert-parallel sentinels fall back to ``transformers``' ``grouped_mm`` implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flexmoe.dispatch import combine, make_layout, permute
from flexmoe.experts.backends import grouped_ffn
from flexmoe.experts.ffn import resolve_backend
from flexmoe.hf import _transformers
from flexmoe.hf.families import activation_of, experts_problem

__all__ = ["EXPERTS_IMPLEMENTATION", "flexmoe_experts_forward", "register_experts_implementation"]

EXPERTS_IMPLEMENTATION = "flexmoe"


def flexmoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """``transformers``' experts interface computed by flexmoe: ``[T, D], [T, K], [T, K] -> [T, D]``.

    Dropless, like every ``transformers`` implementation: each token's output is the
    sum over its ``K`` experts of ``weight * expert(x)``.
    """
    if getattr(self, "_is_expert_parallel", False) or experts_problem(self) is not None:
        moe = _transformers.load("transformers.integrations.moe")
        fallback: Tensor = moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return fallback
    experts: Any = self
    w_in: Tensor = experts.gate_up_proj
    w_out: Tensor = experts.down_proj
    b_in: Tensor | None = getattr(self, "gate_up_proj_bias", None)
    b_out: Tensor | None = getattr(self, "down_proj_bias", None)
    activation = activation_of(self)
    assert activation is not None  # experts_problem checked it
    num_experts = w_in.shape[0]
    x_TD = hidden_states.to(w_in.dtype)  # transformers' grouped_mm convention under autocast
    # 1. expert-major order of the T*K routed rows (dropless)
    layout = make_layout(top_k_index, top_k_weights, num_experts, 0.0)
    # 2. gather the rows, and the routing weight of each
    x_ND = permute(x_TD, layout)
    row_weights_N = top_k_weights.reshape(-1).index_select(0, layout.slot_ids_N).to(x_ND.dtype)
    # 3. grouped expert GEMMs, each row scaled by its weight
    widths = (w_in.shape[2], w_in.shape[1], w_out.shape[2])
    backend = resolve_backend("auto", x_ND.device, x_ND.dtype, widths)
    with torch.autocast(x_ND.device.type, enabled=False):
        y_ND = grouped_ffn(backend, x_ND, layout.counts, w_in, w_out, b_in, b_out, activation, row_weights_N)
    # 4. per-token sum
    return combine(y_ND, layout).to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Register ``"flexmoe"`` in ``transformers``' experts registry (idempotent); returns the name.

    Then ``from_pretrained(..., experts_implementation="flexmoe")``,
    ``from_config(config, experts_implementation="flexmoe")`` or
    ``model.set_experts_implementation("flexmoe")`` select it.
    """
    moe = _transformers.load("transformers.integrations.moe")
    moe.ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, flexmoe_experts_forward)
    return EXPERTS_IMPLEMENTATION
