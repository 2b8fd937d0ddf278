"""``torch.compile`` helpers that cost nothing until something is compiled.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied, which takes
longer than importing ``torch`` itself (about 1.5 s). flexmoe's modules decorate a few
functions with it, so applied at import time it would slow every process that imports
flexmoe, compiled or not (the command line, every worker of a distributed job).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["eager_only"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def eager_only(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``torch.compiler.disable(fn)``, applied when ``fn`` is first called.

    Inside a compiled model the call is a graph break and ``fn`` runs eagerly, as with
    the decorator itself; ``torch._dynamo`` is imported at the first call, not on import.
    """
    disabled: Callable[_P, _T] | None = None

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    # What torch.compiler.disable marks its wrappers with, and what dynamo checks before
    # inlining a call: it stops at `call` itself (a graph break, `call` run eagerly) as at
    # a function torch.compiler.disable wrapped, and never traces the lazy wrapping.
    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    return call
