"""Small MoE models (the main job's language model)."""

from flexmoe.models.data import ByteCorpus, stdlib_corpus
from flexmoe.models.tiny_lm import TinyMoELM, TinyMoELMConfig

__all__ = ["ByteCorpus", "TinyMoELM", "TinyMoELMConfig", "stdlib_corpus"]
