"""Which ``transformers`` sparse-MoE blocks convert to flexmoe, how, and why the others do not.

Every block class that ``discover_moe_blocks`` finds is in exactly one of ``SUPPORTED``
(its router semantics written as a ``Family``, each checked against the block's own
forward by the tests) or ``REFUSED`` (with the reason); a class in neither (a newer
``transformers``, remote code) is refused as not verified.

The semantics were read from each family's ``modeling_*.py`` in transformers 5.24 and 5.25.
Router vocabulary, in the order the router applies it:

- ``scores``: ``softmax`` over all experts, or an independent ``sigmoid`` per expert.
  A top-k of the logits followed by a softmax over the k chosen logits (GraniteMoE,
  Cohere2-MoE) is ``softmax`` with ``normalize``: the same experts, the same weights.
- ``selection_bias``: a per-expert bias added to the scores for the top-k *choice* only
  (DeepSeek-V3's ``e_score_correction_bias``); flexmoe shares the tensor.
- ``groups``: group-limited routing (DeepSeek); groups are ranked by their best score
  (softmax, DeepSeek-V2) or the sum of their two best scores (sigmoid, DeepSeek-V3).
- ``normalize``: renormalise the k chosen weights to sum to one (``norm_topk_prob``).
- ``scale``: multiply the weights (``routed_scaling_factor``); a block that multiplies
  the routed output instead is the same map, the experts being linear in their weight.
- ``shared`` / ``shared_gate``: always-on experts added to the routed output, optionally
  scaled by ``sigmoid(shared_gate(x))`` (Qwen2-MoE); the ``transformers`` modules run as is.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import nn

from flexmoe.hf import _transformers

__all__ = [
    "REFUSED",
    "SUPPORTED",
    "Family",
    "UnsupportedMoEError",
    "activation_of",
    "expert_layout_problem",
    "experts_problem",
    "family_of",
]

Scores = Literal["softmax", "sigmoid"]
Resolvable = Any  # a constant, an attribute path of the block ("gate.norm_topk_prob"), or a function of it


class UnsupportedMoEError(ValueError):
    """A ``transformers`` MoE block that flexmoe does not convert, with the reason.

    Attributes:
        block_class: the block's class name, e.g. ``"PhimoeSparseMoeBlock"``.
        reason: why it is refused.
        path: where the block sits in the model (``None`` when checked by class).
    """

    def __init__(self, block_class: str, reason: str, path: str | None = None) -> None:
        self.block_class = block_class
        self.reason = reason
        self.path = path
        where = f" at {path!r}" if path else ""
        super().__init__(f"{block_class}{where} is not supported by flexmoe.hf: {reason}")


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one block class maps onto a ``MoELayer``.

    Values marked *resolvable* are a constant, an attribute path on the block (a
    string such as ``"gate.norm_topk_prob"``), or a function of the block.

    Attributes:
        scores: ``"softmax"`` or ``"sigmoid"``, or a function of the block returning one.
        normalize: renormalise the top-k weights (resolvable).
        router: the block's attribute holding the router.
        router_weight: path of the ``[E, D]`` router weight (default ``"<router>.weight"``).
        top_k: path of ``K`` (default ``"<router>.top_k"``).
        scale: routed scaling factor (resolvable).
        groups: ``(num_groups, topk_groups)`` paths, or a function returning the pair or
            ``None`` (no group-limited routing).
        selection_bias: path of the selection-bias tensor (``[E]``, or ``[1, E]``).
        shared: path of the always-on expert module (missing or ``None``: none).
        shared_gate: path of its sigmoid gate (an ``nn.Linear(D, 1)``).
        post_norm: path of a module applied to the block's output.
        check: returns a reason to refuse this instance (a configuration flexmoe does
            not reproduce), or ``None``.
        note: a documented numerical difference, if any.
    """

    scores: Scores | Callable[[nn.Module], Scores]
    normalize: Resolvable = False
    router: str = "gate"
    router_weight: str | None = None
    top_k: str | None = None
    scale: Resolvable = 1.0
    groups: tuple[str, str] | Callable[[nn.Module], tuple[int, int] | None] | None = None
    selection_bias: str | None = None
    shared: str | None = None
    shared_gate: str | None = None
    post_norm: str | None = None
    check: Callable[[nn.Module], str | None] | None = None
    note: str = ""


def resolve(block: nn.Module, value: Resolvable) -> Any:
    """A constant as is, an attribute path looked up on ``block`` (missing: ``None``), a function called."""
    if isinstance(value, str):
        try:
            return operator.attrgetter(value)(block)
        except AttributeError:
            return None
    if callable(value):
        return value(block)
    return value


# ------------------------------------------------------------------ instance checks
def _no_jitter(block: nn.Module) -> str | None:
    jitter = getattr(block, "jitter_noise", 0.0) or 0.0
    if jitter > 0:
        return (
            f"router_jitter_noise={jitter} multiplies the expert inputs by random noise while "
            "training; flexmoe's input_jitter only perturbs the router input"
        )
    return None


def _deepseek_v2_groups(block: nn.Module) -> tuple[int, int] | None:
    gate: Any = block.gate
    if gate.topk_method == "group_limited_greedy":
        return int(gate.num_group), int(gate.topk_group)
    return None


def _deepseek_v2_method(block: nn.Module) -> str | None:
    gate: Any = block.gate
    method = gate.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        return f"topk_method={method!r} (flexmoe maps 'greedy' and 'group_limited_greedy')"
    return None


def _no_fp32_combine(block: nn.Module) -> str | None:
    if getattr(block, "enable_moe_fp32_combine", False):
        return "enable_moe_fp32_combine=True adds the routed and shared outputs in fp32"
    return None


def _no_softcap(block: nn.Module) -> str | None:
    gate: Any = block.gate
    cap = getattr(gate, "router_logit_softcapping", 0.0) or 0.0
    if cap > 0:
        return f"moe_router_logit_softcapping={cap} soft-caps the router logits with tanh"
    return None


def _lfm2_check(block: nn.Module) -> str | None:
    gate: Any = block.gate
    if gate.norm_topk_prob:
        return (
            "norm_topk_prob=True renormalises with a +1e-6 epsilon in the denominator, which "
            "flexmoe's router does not reproduce exactly"
        )
    return None


def _cohere2_scores(block: nn.Module) -> Scores:
    gate: Any = block.gate
    return "sigmoid" if gate.expert_selection_fn == "sigmoid" else "softmax"


def _cohere2_normalize(block: nn.Module) -> bool:
    # softmax over the top-k logits is a renormalised top-k of the full softmax.
    gate: Any = block.gate
    return _cohere2_scores(block) == "softmax" or bool(gate.norm_topk_prob)


def _cohere2_check(block: nn.Module) -> str | None:
    gate: Any = block.gate
    if gate.expert_selection_fn not in ("softmax", "sigmoid"):
        return f"expert_selection_fn={gate.expert_selection_fn!r}"
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    if getattr(block, "num_shared_experts", 0) > 0 and strategy != "sum":
        return f"shared_expert_combination_strategy={strategy!r} (flexmoe adds the shared output)"
    return None


# --------------------------------------------------------------------- the table
_MIXTRAL = Family(scores="softmax", normalize=True, check=_no_jitter)
_QWEN3 = Family(scores="softmax", normalize="gate.norm_topk_prob")
_QWEN2 = Family(
    scores="softmax",
    normalize="gate.norm_topk_prob",
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
_GRANITE = Family(scores="softmax", normalize=True, router="router")  # top-k logits, then softmax
_DEEPSEEK_V2 = Family(
    scores="softmax",
    scale="gate.routed_scaling_factor",
    groups=_deepseek_v2_groups,
    shared="shared_experts",
    check=_deepseek_v2_method,
)
_DEEPSEEK_V3 = Family(
    scores="sigmoid",
    normalize="gate.norm_topk_prob",
    scale="gate.routed_scaling_factor",
    groups=("gate.num_group", "gate.topk_group"),
    selection_bias="gate.e_score_correction_bias",
    shared="shared_experts",
)

SUPPORTED: dict[str, Family] = {
    # softmax -> top-k (-> renormalise)
    "MixtralSparseMoeBlock": _MIXTRAL,
    "MiniMaxSparseMoeBlock": _MIXTRAL,
    "Qwen3MoeSparseMoeBlock": _QWEN3,
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": _QWEN3,
    "MellumSparseMoeBlock": _QWEN3,
    "OlmoeSparseMoeBlock": _QWEN3,
    "FlexOlmoSparseMoeBlock": _QWEN3,
    "Qwen3VLMoeTextSparseMoeBlock": Family(scores="softmax", normalize=True),
    "Qwen2MoeSparseMoeBlock": _QWEN2,
    "Qwen3NextSparseMoeBlock": _QWEN2,
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": _QWEN2,
    "Qwen4ExpTextSparseMoeBlock": _QWEN2,
    "Qwen3_5MoeSparseMoeBlock": Family(
        scores="softmax", normalize=True, shared="shared_expert", shared_gate="shared_expert_gate"
    ),
    "LaraMiniSparseMoeBlock": Family(
        scores="softmax", normalize="gate.norm_topk_prob", shared="shared_expert"
    ),
    "GraniteMoeMoE": _GRANITE,
    "GraniteMoeSharedMoE": _GRANITE,
    "GraniteMoeHybridMoE": _GRANITE,
    "GraniteMoeSWAMoE": _GRANITE,
    "JambaSparseMoeBlock": Family(scores="softmax", normalize=False, router="router"),
    "HunYuanMoEV1Moe": Family(
        scores="softmax", normalize=True, router_weight="gate.wg.weight", shared="shared_mlp"
    ),
    "Ernie4_5_MoeSparseMoeBlock": Family(
        scores="softmax",
        normalize=True,
        selection_bias="gate.moe_statics.e_score_correction_bias",
        shared="shared_experts",
        note=(
            "transformers clamps the renormalisation denominator at moe_norm_min (1e-12), flexmoe at "
            "1e-20: equal unless the chosen probabilities sum below 1e-12"
        ),
    ),
    "Cohere2MoeSparseMoeBlock": Family(
        scores=_cohere2_scores, normalize=_cohere2_normalize, shared="shared_experts", check=_cohere2_check
    ),
    "DeepseekV2Moe": _DEEPSEEK_V2,
    "DeepseekOcr2TextMoe": _DEEPSEEK_V2,
    "UnlimitedOcrTextMoe": _DEEPSEEK_V2,
    # sigmoid (+ selection bias) (+ groups) -> top-k -> renormalise -> scale
    "DeepseekV3MoE": _DEEPSEEK_V3,
    "DeepseekV32MoE": _DEEPSEEK_V3,
    "Dots1MoE": _DEEPSEEK_V3,
    "Dots3NoteTextMoE": _DEEPSEEK_V3,
    "KimiLinearMoE": _DEEPSEEK_V3,
    "SolarOpenMoE": _DEEPSEEK_V3,
    "BailingHybridMoE": _DEEPSEEK_V3,
    "Glm4MoeMoE": _DEEPSEEK_V3,
    "Glm4MoeLiteMoE": _DEEPSEEK_V3,
    "Glm4vMoeTextMoE": _DEEPSEEK_V3,
    "GlmMoeDsaMoE": _DEEPSEEK_V3,
    "ExaoneMoeSparseMoEBlock": _DEEPSEEK_V3,
    "MiMoV2FlashMoE": _DEEPSEEK_V3,
    "MiniCPM5MoeMoE": _DEEPSEEK_V3,
    "AXK1MoE": Family(
        scores="sigmoid",
        normalize="gate.norm_topk_prob",
        scale="gate.routed_scaling_factor",
        groups=("gate.num_group", "gate.topk_group"),
        selection_bias="gate.e_score_correction_bias",
        shared="shared_experts",
        post_norm="post_mlp_layernorm",
    ),
    "MiniMaxM2SparseMoeBlock": Family(
        scores="sigmoid", normalize=True, selection_bias="e_score_correction_bias"
    ),
    "Dots3NoteVisionMoE": Family(
        scores="sigmoid",
        normalize=True,
        scale="gate.router_scaling_factor",
        selection_bias="e_score_correction_bias",
    ),
    "HYV3MoE": Family(
        scores="sigmoid",
        normalize=True,
        scale="gate.router_scaling_factor",
        selection_bias="e_score_correction_bias",
        shared="shared_experts",
        check=_no_fp32_combine,
    ),
    "LagunaSparseMoeBlock": Family(
        scores="sigmoid",
        normalize=True,
        scale="routed_scaling_factor",
        selection_bias="gate.e_score_correction_bias",
        shared="shared_experts",
        check=_no_softcap,
    ),
    "AfmoeSparseMoeBlock": Family(
        scores="sigmoid",
        normalize=True,
        router="router",
        router_weight="router.gate.weight",
        scale="router.route_scale",
        selection_bias="expert_bias",
        shared="shared_experts",
    ),
    "FlintSparseMoeBlock": Family(scores="sigmoid", normalize="gate.norm_topk_prob", shared="shared_expert"),
    "Lfm2MoeSparseMoeBlock": Family(
        scores="sigmoid",
        normalize=False,
        scale="gate.routed_scaling_factor",
        selection_bias="expert_bias",
        check=_lfm2_check,
    ),
}

_CLAMPED_SWIGLU = (
    "clamped SwiGLU experts (swiglu_limit), an activation flexmoe's expert kernels do not compute"
)
_GPT_OSS = (
    "experts with biases, interleaved gate/up columns and gpt-oss's clamped SwiGLU with alpha "
    "((up + 1) * gate * sigmoid(alpha * gate)), which flexmoe's expert kernels do not compute"
)
_INLINED = (
    "the MoE is inlined in the decoder layer (router, experts and extra norms run inside the layer's "
    "forward), so there is no separable MoE block to replace"
)
_SOFTMAX_TOP2_GROUPS = (
    "group-limited routing over softmax scores ranks groups by the sum of their two best scores and "
    "masks the others with 0; flexmoe's softmax groups are ranked by their best score"
)
_SWITCH = (
    "experts are separate dense modules with per-expert capacity, dropping and router jitter "
    "(Switch/NLLB routing), not stacked expert weights"
)

_LOGIT_CHOICE = (
    "experts are chosen by router logits plus a bias but weighted by the sigmoid of the logits; "
    "flexmoe adds the selection bias to the scores"
)

REFUSED: dict[str, str] = {
    "AriaTextMoELayer": (
        "experts are stored transposed (gate_up_proj [E, D, 2F]); flexmoe would need a transposed copy "
        "of every expert"
    ),
    "AXK2MoE": (
        "group-limited routing masks the other groups with 0 instead of -inf, which differs from flexmoe "
        "once the biased scores go negative"
    ),
    "BeamMoE": "a custom gated activation (_apply_gate computes the SwiGLU in fp32 and casts back)",
    "DbrxFFN": (
        "experts stored as flat [E*F, D] matrices (w1, v1, w2), optional p-norm weight normalisation "
        "(moe_normalize_expert_weights) and input jitter"
    ),
    "DeepseekV4SparseMoeBlock": f"hash routing on the input ids in some layers, and {_CLAMPED_SWIGLU}",
    "DiffusionGemmaDecoderTextLayer": _INLINED,
    "DiffusionGemmaEncoderTextLayer": _INLINED,
    "Gemma4TextDecoderLayer": _INLINED,
    "ErgoMoE": (
        "non-gated relu^2 experts stored transposed, each expert's output RMS-normalised with its own "
        "learned scale before the weighted sum"
    ),
    "DogeCDMoE": (
        "product-key retrieval of single-neuron experts stored as embedding tables, not a top-k over "
        "FFN experts"
    ),
    "Ernie4_5_VLMoeMoeBlock": "routes text and vision tokens to two different expert sets by token type",
    "Ernie4_5_VLMoeSparseMoeBlock": (
        "the per-modality half of Ernie4_5_VLMoeMoeBlock: returns flattened (output, router_logits)"
    ),
    "Glm5NextTextMoE": _CLAMPED_SWIGLU,
    "HYV4MoE": _CLAMPED_SWIGLU,
    "HYV4VLMoE": _CLAMPED_SWIGLU,
    "Step3p7SparseMoeBlock": _CLAMPED_SWIGLU,
    "MiniMaxM3VLSparseMoeBlock": _GPT_OSS,
    "GptOssMLP": _GPT_OSS,
    "OpenAIPrivacyFilterMLP": _GPT_OSS,
    "InklingMoE": (
        "shared experts weighted by router-computed gammas (one softmax over the routed and shared logits)"
    ),
    "Inkling2SparseMoeBlock": "soft-capped SwiGLU experts (a custom activation) with fp32 accumulation",
    "Inkling2LoopSparseMoeBlock": "soft-capped SwiGLU experts (a custom activation) with fp32 accumulation",
    "JetMoeAttention": "a mixture of attention heads (MoA), not a feed-forward MoE",
    "JetMoeMoA": "a mixture of attention heads (MoA), not a feed-forward MoE",
    "JetMoeMoE": "JetMoE's own parallel-experts layout (input_linear / output_linear) with an output bias",
    "Kolibri1SparseMoeBlock": _LOGIT_CHOICE,
    "Kolibri1_1SparseMoeBlock": _LOGIT_CHOICE,
    "Llama4TextMoe": (
        "scales each expert's input (not its output) by a sigmoid router score, and returns "
        "(output, router_logits)"
    ),
    "LongcatFlashMoE": "zero-computation (identity) experts among the routed experts",
    "Mistral4MoE": _SOFTMAX_TOP2_GROUPS,
    "MistralLarge4TextMoE": _SOFTMAX_TOP2_GROUPS,
    "MuseSparkMoE": (
        "tokens are projected into a separate expert space (pre/post projections and norms) and each "
        "expert output is normalised"
    ),
    "NemotronHMoE": "non-gated experts (up_proj with relu^2) and optional latent projections",
    "NllbMoeSparseMLP": _SWITCH,
    "SwitchTransformersSparseMLP": _SWITCH,
    "PhimoeSparseMoeBlock": "SparseMixer routing (a sampled, straight-through top-2), not a top-k of scores",
    "VitPoseBackboneMoeMLP": "not routed: each sample's expert is chosen by its dataset index",
    "VitPoseNaiveMoe": "not routed: each sample's expert is chosen by its dataset index",
    "ZayaSparseMoeBlock": "an MLP router with state carried between layers, and a skip expert",
}


def family_of(block_class: type[nn.Module]) -> Family:
    """The ``Family`` of a block class, or ``UnsupportedMoEError`` with the reason."""
    name = block_class.__name__
    module = block_class.__module__
    if not module.startswith("transformers.models."):
        raise UnsupportedMoEError(name, f"not a transformers model class (defined in {module})")
    if name in REFUSED:
        raise UnsupportedMoEError(name, REFUSED[name])
    if name not in SUPPORTED:
        raise UnsupportedMoEError(
            name, "not verified with flexmoe (a block class this version of flexmoe.hf does not know)"
        )
    return SUPPORTED[name]


def activation_of(experts: nn.Module) -> str | None:
    """The flexmoe gated activation equal to ``experts.act_fn``, or ``None``."""
    act = getattr(experts, "act_fn", None)
    kind = type(act).__name__
    if act is F.silu or isinstance(act, nn.SiLU) or kind == "SiLUActivation":
        return "swiglu"
    exact_gelu = kind == "GELUActivation" and getattr(act, "act", None) is F.gelu
    if act is F.gelu or exact_gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "geglu"
    return None


def expert_layout_problem(block: nn.Module, experts: nn.Module) -> str | None:
    """Why ``block``'s ``experts`` cannot be shared as flexmoe's grouped experts, or ``None``."""
    if type(experts).__module__ != type(block).__module__:
        return (
            f"its experts module is {type(experts).__module__}.{type(experts).__name__} "
            "(replaced, e.g. by a quantization method)"
        )
    problem = experts_problem(experts)
    if problem is None and (getattr(experts, "has_bias", False) or hasattr(experts, "gate_up_proj_bias")):
        return "its experts have biases"
    return problem


# Experts classes whose ``_apply_gate`` clamps the gate and up halves at ``self.limit`` and
# is the plain gated unit when ``limit`` is ``None`` (transformers 5.25's Ling 2.5 experts).
_PLAIN_GATE_WITHOUT_LIMIT = frozenset({"BailingHybridExperts"})


def experts_problem(experts: nn.Module) -> str | None:
    """Why a ``transformers`` experts module does not run on flexmoe's expert kernels, or ``None``.

    flexmoe's ``GroupedExperts`` stores ``w_in [E, 2F, D]`` with rows ``[gate; up]`` and
    ``w_out [E, D, F]`` (optionally biases ``[E, 2F]``, ``[E, D]``): transformers 5's
    ``gate_up_proj`` and ``down_proj``, untransposed and concatenated.
    """
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return "its experts are not stacked gate_up_proj / down_proj parameters"
    if gate_up.dim() != 3 or down.dim() != 3 or not gate_up.is_floating_point():
        shapes = f"{tuple(gate_up.shape)} / {tuple(down.shape)}"
        return f"expert weights of shape {shapes} and dtype {gate_up.dtype}"
    if getattr(experts, "is_transposed", False):
        return "its experts are stored transposed"
    if not getattr(experts, "is_concatenated", True):
        return "its gate and up projections are interleaved, not concatenated"
    if getattr(experts, "has_post_expert_norm", False):
        return "its experts normalise their outputs"
    num_experts, width, dim = gate_up.shape
    if tuple(down.shape) != (num_experts, dim, width // 2) or width % 2:
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not match"
    moe = _transformers.load("transformers.integrations.moe")
    apply_gate = getattr(type(experts), "_apply_gate", moe._default_apply_gate)
    if apply_gate is not moe._default_apply_gate:
        if type(experts).__name__ not in _PLAIN_GATE_WITHOUT_LIMIT:
            return "its experts define their own gated activation (_apply_gate)"
        limit = getattr(experts, "limit", None)
        if limit is not None:
            return f"clamped SwiGLU experts (limit={limit}), which flexmoe's expert kernels do not compute"
    if activation_of(experts) is None:
        act = getattr(experts, "act_fn", None)
        return f"expert activation {type(act).__name__} (flexmoe computes SiLU and exact GELU gated units)"
    return None
