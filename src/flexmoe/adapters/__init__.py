"""Expert adapters: LoRA on the grouped experts, and PEFT's adapter format for converted models.

    from flexmoe.adapters import add_lora, lora_state_dict, merge_lora

    add_lora(model, rank=8, alpha=16)   # every GroupedExperts gets an adapter; the base is frozen
    ...                                 # train: only the adapters get gradients
    state = lora_state_dict(model)      # just the adapters
    merge_lora(model)                   # fold them into the expert weights for serving

``save_peft_adapter`` / ``load_peft_adapter`` write and read the files PEFT's
``save_pretrained`` writes for ``LoraConfig(target_parameters=[... gate_up_proj,
... down_proj])`` on the unconverted ``transformers`` model.
"""

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
from flexmoe.experts.lora import ExpertLoRA

__all__ = [
    "ExpertLoRA",
    "add_lora",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_adapters",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "save_peft_adapter",
    "unmerge_lora",
]
