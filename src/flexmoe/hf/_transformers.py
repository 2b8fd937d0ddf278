"""Lazy access to ``transformers``, an optional dependency (``pip install 'flexmoe[hf]'``).

Nothing here imports ``transformers`` at import time, and the rest of ``flexmoe.hf``
reaches it only through these functions, so ``import flexmoe`` works without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["MIN_TRANSFORMERS_MAJOR", "load", "require"]

# transformers 5 stores each block's experts as two stacked 3-D tensors
# (``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``), the layout flexmoe shares.
MIN_TRANSFORMERS_MAJOR = 5


def require() -> ModuleType:
    """The ``transformers`` package, or an ``ImportError`` saying what to install."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(
            "flexmoe.hf needs transformers>=5 (pip install 'flexmoe[hf]' or pip install 'transformers>=5')"
        ) from error
    major = int(str(transformers.__version__).split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise ImportError(
            f"flexmoe.hf needs transformers>={MIN_TRANSFORMERS_MAJOR} (stacked 3-D expert weights), "
            f"found {transformers.__version__}"
        )
    return transformers


def load(module: str) -> Any:
    """Import ``module`` (a ``transformers`` submodule) after checking the version."""
    require()
    return importlib.import_module(module)
