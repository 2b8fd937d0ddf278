"""Which names ``state_dict`` uses where a module shows another library's (converted ``transformers``).

A converted block saves and loads under the original model's names, so that
``save_pretrained`` writes a model ``transformers`` reads without flexmoe. flexmoe's own
checkpoints store the layers' tensors under flexmoe's names instead (experts whole, one
per tensor, gathered without a collective inside ``state_dict``): they ask for them with
``flexmoe_state_names()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["flexmoe_state_names", "flexmoe_state_names_requested"]

_REQUESTED: ContextVar[bool] = ContextVar("flexmoe_state_names", default=False)


@contextmanager
def flexmoe_state_names() -> Iterator[None]:
    """Inside the block, ``state_dict`` and ``load_state_dict`` use flexmoe's own names everywhere."""
    token = _REQUESTED.set(True)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def flexmoe_state_names_requested() -> bool:
    """Whether the caller is inside ``flexmoe_state_names()``."""
    return _REQUESTED.get()
