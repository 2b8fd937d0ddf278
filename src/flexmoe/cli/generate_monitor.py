"""What ``flexmoe generate`` measures while a model generates, and its live status line.

``GenerationMonitor`` is a ``transformers`` logits processor that changes nothing: it is
called once per forward (the prefill, then one call per new token), right after the
forward, so it times each step, counts the experts per token of that forward (from the
MoE layers' statistics under top-p routing, a host sync per layer; from ``top_k``
otherwise) and reads, on a model from ``load_offloaded``, the expert cache's
statistics. From those it builds ``GenerationSummary``.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import Tensor

from flexmoe.experts.cache import CacheStats
from flexmoe.layer import MoELayer

__all__ = ["GenerationMonitor", "GenerationSummary", "LiveLine", "cache_delta", "peak_rss_bytes"]


def cache_delta(after: CacheStats, before: CacheStats) -> CacheStats:
    """The counters of ``after`` less those of ``before``; the byte levels of ``after`` (now, peak)."""
    levels = {"budget_bytes", "resident_bytes", "peak_resident_bytes"}
    counted = {
        f.name: getattr(after, f.name) - getattr(before, f.name)
        for f in dataclasses.fields(CacheStats)
        if f.name not in levels
    }
    return dataclasses.replace(after, **counted)


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@dataclass(frozen=True)
class GenerationSummary:
    """One generation, measured.

    Attributes:
        prompt_tokens, new_tokens: tokens given and generated.
        prefill_s: from the call to the first token's logits (the prompt's forward);
            ``prefill_tokens_per_s`` the prompt tokens over that time.
        decode_s: from the first token's logits to the last's (``new_tokens - 1``
            forwards of one token); ``decode_tokens_per_s`` is ``None`` for one new token.
        prefill_experts_per_token, decode_experts_per_token: routed experts per token
            and MoE layer, averaged over the layers and the tokens of each phase.
        cache: the expert cache's statistics of this generation (counters since it
            began; resident and peak bytes as at its end), ``None`` for an in-memory model.
        prefill_bytes_read: expert bytes read during the prefill (``None`` in memory).
        peak_rss_bytes: the process's peak resident memory.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    prefill_experts_per_token: float
    decode_experts_per_token: float | None
    cache: CacheStats | None
    prefill_bytes_read: int | None
    peak_rss_bytes: int

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens per second after the first (``None`` with one new token)."""
        steps = self.new_tokens - 1
        if steps <= 0:
            return None
        return steps / self.decode_s if self.decode_s > 0 else float("inf")

    @property
    def decode_bytes_read_per_token(self) -> float | None:
        """Expert bytes read per token after the first (``None`` in memory or with one new token)."""
        if self.cache is None or self.prefill_bytes_read is None or self.new_tokens <= 1:
            return None
        return (self.cache.bytes_read - self.prefill_bytes_read) / (self.new_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON values (the cache's fields under ``"cache"``)."""
        cache = None
        if self.cache is not None:
            stats = self.cache
            cache = {
                **dataclasses.asdict(stats),
                "hit_rate": stats.hit_rate,
                "prefetch_precision": stats.prefetch_precision,
                "prefetch_recall": stats.prefetch_recall,
                "prefill_bytes_read": self.prefill_bytes_read,
                "decode_bytes_read_per_token": self.decode_bytes_read_per_token,
            }
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_experts_per_token": self.prefill_experts_per_token,
            "decode_experts_per_token": self.decode_experts_per_token,
            "cache": cache,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


class LiveLine:
    """One status line rewritten in place on a terminal (nothing when ``stream`` is not one).

    ``show`` redraws at most every ``interval`` seconds; ``close`` clears the line.
    """

    def __init__(self, stream: TextIO, *, enabled: bool | None = None, interval: float = 0.1) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.last = -float("inf")
        self.width = 0

    def show(self, text: str, *, force: bool = False) -> None:
        """Replace the line by ``text`` (throttled unless ``force``)."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.width = len(text)

    def close(self) -> None:
        """Clear the line."""
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class GenerationMonitor:
    """A pass-through logits processor that measures each forward of ``generate``.

    Call ``start()`` right before ``generate`` and ``summary(...)`` after it; pass the
    monitor in ``logits_processor``. ``cache_stats`` returns the expert cache's
    statistics (``None`` for an in-memory model); ``on_step`` is called after every
    forward with the monitor (for a live display).
    """

    def __init__(
        self,
        layers: list[MoELayer],
        cache_stats: Callable[[], CacheStats | None],
        on_step: Callable[[GenerationMonitor], None] | None = None,
    ) -> None:
        self.layers = layers
        self.cache_stats = cache_stats
        self.on_step = on_step
        self.started = 0.0
        self.step_times: list[float] = []
        self.cache_at_start: CacheStats | None = None
        self.cache_after_prefill: CacheStats | None = None
        # per phase (0 prefill, 1 decode): routed expert choices, and token-layer pairs
        self.choices = [0.0, 0.0]
        self.token_layers = [0, 0]

    def start(self) -> None:
        """Mark the start of generation (the prefill's clock and the cache's counters)."""
        self.cache_at_start = self.cache_stats()
        self.started = time.perf_counter()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Record the forward that produced ``scores``; return them unchanged."""
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)  # NOTE: host sync, for honest step times
        self.step_times.append(time.perf_counter())
        phase = 0 if len(self.step_times) == 1 else 1
        # the tokens of this forward: the prompt, then one per sequence
        tokens = input_ids.numel() if phase == 0 else input_ids.shape[0]
        for layer in self.layers:
            self._count_experts(layer, phase, tokens)
        if phase == 0:
            self.cache_after_prefill = self.cache_stats()
        if self.on_step is not None:
            self.on_step(self)
        return scores

    def _count_experts(self, layer: MoELayer, phase: int, tokens: int) -> None:
        """Add the experts ``layer`` gave each token of the last forward."""
        config = layer.config
        if config.router.top_p is None and not config.experts.zero_experts:
            # every token takes top_k routed experts: no need to read the layer's counts
            self.choices[phase] += config.top_k * tokens
            self.token_layers[phase] += tokens
            return
        stats = layer.stats  # NOTE: host sync (built from the last forward's counts)
        if stats is not None:
            self.choices[phase] += stats.mean_experts_per_token * stats.num_tokens
            self.token_layers[phase] += stats.num_tokens

    @property
    def new_tokens(self) -> int:
        """Forwards seen so far: each one gives a new token."""
        return len(self.step_times)

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self.started

    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second after the first, so far (``None`` before the second)."""
        if len(self.step_times) < 2:
            return None
        spent = self.step_times[-1] - self.step_times[0]
        return (len(self.step_times) - 1) / spent if spent > 0 else None

    def cache_so_far(self) -> CacheStats | None:
        """The cache's statistics since ``start`` (``None`` in memory)."""
        now = self.cache_stats()
        if now is None or self.cache_at_start is None:
            return None
        return cache_delta(now, self.cache_at_start)

    def summary(self, prompt_tokens: int, new_tokens: int) -> GenerationSummary:
        """The measurements of the generation just finished (``new_tokens`` as ``generate`` returned)."""
        if not self.step_times:
            raise RuntimeError("generate made no forward (the monitor was not in its logits_processor)")
        first, last = self.step_times[0], self.step_times[-1]
        cache = self.cache_so_far()
        prefill_read = None
        if self.cache_after_prefill is not None and self.cache_at_start is not None:
            prefill_read = self.cache_after_prefill.bytes_read - self.cache_at_start.bytes_read
        return GenerationSummary(
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            prefill_s=first - self.started,
            decode_s=last - first,
            prefill_experts_per_token=_mean(self.choices[0], self.token_layers[0]) or 0.0,
            decode_experts_per_token=_mean(self.choices[1], self.token_layers[1]),
            cache=cache,
            prefill_bytes_read=prefill_read,
            peak_rss_bytes=peak_rss_bytes(),
        )


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None
