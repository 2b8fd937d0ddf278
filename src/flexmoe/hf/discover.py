"""Find every sparse-MoE block class that the installed ``transformers`` ships.

The scan reads the source of ``transformers/models/*/modeling_*.py`` (it imports
nothing, so it takes a fraction of a second). A class is a sparse-MoE block when its
``__init__`` assigns ``self.experts``, or when its name ends like an MoE block
(``...MoE``, ``...Moe``, ``...MoeBlock``, ``...SparseMLP``, ``...MoA``, ``...MoELayer``)
and its ``__init__`` assigns a router (``self.gate``, ``self.router``, ``self.router_gate``)
or ``self.num_experts``. That
catches decoder layers that inline their MoE (Gemma 4) and a mixture of attention
heads (JetMoE) as well; ``flexmoe.hf.families`` says which ones convert and why the
others do not.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flexmoe.hf import _transformers

__all__ = ["MoEBlockClass", "discover_moe_blocks"]

_MOE_NAME = re.compile(r"(MoE|Moe|MoeBlock|MoEBlock|SparseMLP|MoA|MoELayer)$")


@dataclass(frozen=True)
class MoEBlockClass:
    """One sparse-MoE block class of the installed ``transformers``.

    Attributes:
        model_type: the ``transformers.models`` sub-package (the model family), e.g. ``"mixtral"``.
        module: the module that defines it, e.g. ``"transformers.models.mixtral.modeling_mixtral"``.
        name: the class name, e.g. ``"MixtralSparseMoeBlock"``.
    """

    model_type: str
    module: str
    name: str

    def load(self) -> type[nn.Module]:
        """Import the module and return the class."""
        cls: type[nn.Module] = getattr(importlib.import_module(self.module), self.name)
        return cls


def _assigned_attributes(init: ast.FunctionDef) -> set[str]:
    names = set()
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            owner = target.value if isinstance(target, ast.Attribute) else None
            if isinstance(target, ast.Attribute) and isinstance(owner, ast.Name) and owner.id == "self":
                names.add(target.attr)
    return names


def _blocks_in(source: str) -> list[str]:
    found = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            continue
        assigned = _assigned_attributes(init)
        moe_like = bool(assigned & {"gate", "router", "router_gate", "num_experts"})
        if "experts" in assigned or (moe_like and _MOE_NAME.search(node.name)):
            found.append(node.name)
    return found


@functools.lru_cache(maxsize=1)
def discover_moe_blocks() -> tuple[MoEBlockClass, ...]:
    """Every sparse-MoE block class in the installed ``transformers``, sorted by family and name."""
    transformers = _transformers.require()
    root = Path(str(transformers.__file__)).parent / "models"
    blocks: list[MoEBlockClass] = []
    for path in sorted(root.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "experts" not in source and "MoE" not in source and "Moe" not in source:
            continue
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        blocks.extend(MoEBlockClass(path.parent.name, module, name) for name in _blocks_in(source))
    return tuple(sorted(blocks, key=lambda b: (b.model_type, b.name)))
