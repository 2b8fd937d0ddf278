"""Experts: grouped FFN experts, GEMM backends, activations, custom-expert adapter."""

from flexmoe.experts.activations import activate
from flexmoe.experts.backends import grouped_ffn, grouped_mm_available
from flexmoe.experts.ffn import DenseFFN, GroupedExperts, ModuleListExperts, resolve_backend

__all__ = [
    "DenseFFN",
    "GroupedExperts",
    "ModuleListExperts",
    "activate",
    "grouped_ffn",
    "grouped_mm_available",
    "resolve_backend",
]
