"""The dtype names of the ``safetensors`` file format, for code that reads its headers itself."""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_DTYPES"]

# An unknown name is refused by the readers rather than guessed.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
