"""Expert adapters: LoRA on the grouped experts, ESFT, PEFT's adapter format, many adapters on one base.

    from flexmoe.adapters import add_lora, lora_state_dict, merge_lora

    add_lora(model, rank=8, alpha=16)   # every GroupedExperts gets an adapter; the base is frozen
    ...                                 # train: only the adapters get gradients
    state = lora_state_dict(model)      # just the adapters
    merge_lora(model)                   # fold them into the expert weights for serving

``save_peft_adapter`` / ``load_peft_adapter`` write and read the files PEFT's
``save_pretrained`` writes for ``LoraConfig(target_parameters=[... gate_up_proj,
... down_proj])`` on the unconverted ``transformers`` model.

ESFT: ``esft_select`` chooses each layer's experts by the task's routing mass,
``esft_prepare`` makes only those train, ``save_esft_adapter`` / ``load_esft_adapter``
write and read just those experts. ``ExpertWeave`` serves any number of LoRA and ESFT
adapters on one base model, one adapter per sequence of a batch (``use``).
"""

from flexmoe.adapters.esft import (
    ESFTAdapter,
    ESFTExperts,
    esft_scores,
    esft_select,
    load_esft_adapter,
    merge_esft_adapter,
    save_esft_adapter,
)
from flexmoe.adapters.esft_training import esft_prepare
from flexmoe.adapters.lora import (
    add_lora,
    load_lora_state_dict,
    lora_adapters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from flexmoe.adapters.peft import load_peft_adapter, save_peft_adapter
from flexmoe.adapters.weave import ExpertWeave, remove_weave, use, weave_of
from flexmoe.experts.lora import ExpertLoRA

__all__ = [
    "ESFTAdapter",
    "ESFTExperts",
    "ExpertLoRA",
    "ExpertWeave",
    "add_lora",
    "esft_prepare",
    "esft_scores",
    "esft_select",
    "load_esft_adapter",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_adapters",
    "lora_state_dict",
    "merge_esft_adapter",
    "merge_lora",
    "remove_lora",
    "remove_weave",
    "save_esft_adapter",
    "save_peft_adapter",
    "unmerge_lora",
    "use",
    "weave_of",
]
