"""Mixed precision that really is mixed: fp32 master weights, autocast for the maths, a loss scaler for fp16."""

import contextlib
from dataclasses import dataclass

import torch

from .errors import SettingsError

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: `autocast_dtype` None means plain fp32."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without scaling; bf16 and fp32 have the range and need none.
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)


def resolve_precision(choice: str, device: torch.device, model_dtype: torch.dtype) -> Precision:
    """Turn "auto"/"fp32"/"fp16"/"bf16" into a Precision for this device and model.

    "auto": a half-precision model computes in its own dtype; an fp32 model computes in bf16
    on GPUs that have it (fp16 otherwise) and in fp32 on the CPU, where bf16 is ~20x slower.
    """
    if choice == "auto":
        if model_dtype in (torch.float16, torch.bfloat16):
            return Precision(device, model_dtype)
        if device.type == "cuda":
            return Precision(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return Precision(device, None)
    if choice == "fp32":
        if model_dtype != torch.float32:
            raise SettingsError(
                f"precision fp32 needs the model loaded in fp32, but it is {model_dtype}; load it with torch_dtype=float32"
            )
        return Precision(device, None)
    if choice not in _DTYPES:
        raise SettingsError(f"precision must be one of auto, fp32, fp16, bf16; got {choice!r}")
    return Precision(device, _DTYPES[choice])
