"""Memory levers of training, chosen per run: where the text encoders and the VAE sit, and whether the frozen base
of a LoRA is held quantized. (Gradient checkpointing and 8-bit Adam are TrainSettings: they shape the trained
weights and an edit state records them; these do not, and are not recorded.)

- `offload_encoders`: once the target text and the photo are encoded, the text encoders and the VAE leave memory
  (a GPU's weights go to CPU memory; on the CPU, to a temporary file) until training ends and sampling needs
  them again.
- `quantize_base` ("int8", "int4"; LoRA only): stages 1 and 2 train over a copy of each level's denoiser with
  its linear layers' weights quantized by optimum-quanto (pip install "imagic[quant]"), while the
  loaded denoiser's weights are out of memory; the LoRA's own matrices stay fp32. The loaded model comes back
  bit for bit, and the edit is sampled over it as a saved state would be.

The loaded pipeline is never modified: its tensors leave memory and come back as they were
(denoisers.offloaded), and the quantized copy is a new module holding new tensors.
"""

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from . import denoisers
from .errors import SettingsError
from .families import Level, ModelFamily

QUANTIZE_CHOICES = ("none", "int8", "int4")


@dataclass(frozen=True)
class MemorySettings:
    """The run's memory levers (module docstring) and, as `max_memory` ("24GiB"), a budget that switches on the
    cheapest of them that fits (memory_budget.choose_levers)."""

    offload_encoders: bool = False
    quantize_base: str = "none"
    max_memory: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.offload_encoders, bool):
            raise SettingsError(f"offload_encoders must be true or false; got {self.offload_encoders!r}")
        if self.quantize_base not in QUANTIZE_CHOICES:
            raise SettingsError(f"quantize_base must be one of {', '.join(QUANTIZE_CHOICES)}; got {self.quantize_base!r}")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)

    @property
    def quantized(self) -> bool:
        return self.quantize_base != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    def changing_outputs(self) -> dict:
        """The levers set that can change what training makes (a quantized base, or a budget that may choose one):
        what a batch records beside each output. Offloading the encoders changes nothing."""
        unset = MemorySettings()
        return {key: value for key, value in self.to_dict().items()
                if key != "offload_encoders" and value != getattr(unset, key)}


_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """ "24GiB", "24 GB", "16384MiB" -> bytes (GiB and GB as written: 2^30 and 10^9)."""
    cleaned = str(text).strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0 or value == float("inf"):
        raise SettingsError(f"max memory must be an amount such as 24GiB, 16GB or 12000MiB; got {text!r}")
    return int(value * _UNITS[unit])


def encoders(family: ModelFamily) -> dict[str, torch.nn.Module]:
    """The pipeline's modules that are not a level's denoiser: its text encoders and VAE."""
    trained = {id(level.denoiser) for level in family.levels}
    return {name: module for name, module in family.components.items()
            if isinstance(module, torch.nn.Module) and id(module) not in trained}


def quantization_available() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no optimum at all
        return False


def _require_quanto():
    if not quantization_available():
        raise SettingsError('a quantized base needs optimum-quanto: pip install "imagic[quant]"')
    from optimum import quanto

    return quanto


def quantized_copy(model: torch.nn.Module, read, qtype: str, device: torch.device) -> torch.nn.Module:
    """A frozen copy of `model` on `device` (the model's own tensors may be out of memory), built from `read(name)`,
    each tensor as it was, one module at a time: its linear layers' weights quantized (optimum-quanto, weights
    only), the rest kept in their dtype. Never more than one float layer beside the quantized ones. (Convolutions
    stay as they are: peft builds a LoRA's matrices of a convolution with its layer's class.)"""
    quanto = _require_quanto()
    weights = {"int8": quanto.qint8, "int4": quanto.qint4}[qtype]
    persistent = set(model.state_dict(keep_vars=True))  # buffers left out of it stay shared, in memory
    copy = denoisers.frozen_view(model)
    for name in [name for name, _ in copy.named_modules()]:  # names only: a float layer replaced is freed at once
        module = copy.get_submodule(name)
        prefix = f"{name}." if name else ""
        for key, param in module.named_parameters(recurse=False):
            param.data = read(prefix + key).to(device, copy=True)
        for key in [key for key, _ in module.named_buffers(recurse=False) if prefix + key in persistent]:
            module._buffers[key] = read(prefix + key).to(device, copy=True)
        if isinstance(module, torch.nn.Linear):
            quantized = quanto.quantize_module(module, weights=weights)
            quantized.freeze()
            quantized.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(copy.get_submodule(parent) if parent else copy, child, quantized)
    return copy


class TrainingLevers:
    """The levers of one training run: `frozen_base(level)` is what stages 1 and 2 train over, and `active(family)`
    holds the run's memory layout while they do."""

    def __init__(self, memory: MemorySettings = MemorySettings()):
        self.memory = memory
        self._quantized: dict[str, torch.nn.Module] = {}

    def frozen_base(self, level: Level) -> torch.nn.Module:
        """A frozen view of the level's denoiser: of its quantized copy while `active` holds one."""
        return denoisers.frozen_view(self._quantized.get(level.name, level.denoiser))

    @contextlib.contextmanager
    def active(self, family: ModelFamily) -> Iterator[None]:
        """While the block runs: the encoders out of memory (offload_encoders), the loaded denoisers out of memory
        behind quantized copies (quantize_base). Everything comes back as it was however the block ends."""
        with contextlib.ExitStack() as stack:
            if self.memory.offload_encoders:
                for module in encoders(family).values():
                    stack.enter_context(denoisers.offloaded(module))
            if self.memory.quantized:
                _require_quanto()
                stack.callback(self._quantized.clear)  # however the copies' building ends
                for level in family.levels:
                    device = next(level.denoiser.parameters()).device  # before its weights leave it
                    read = stack.enter_context(denoisers.offloaded(level.denoiser))
                    self._quantized[level.name] = quantized_copy(level.denoiser, read, self.memory.quantize_base,
                                                                 device)
                # And first on the way out once they are built: they leave before the loaded weights come back.
                stack.callback(self._quantized.clear)
            yield
