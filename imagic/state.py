"""The edit state file: everything needed to sample an edit again without retraining.

One safetensors file: tensors `e_tgt.*`, `e_opt.*` and `weights.*` (the LoRA matrices or the
full fine-tuned UNet), and a JSON header under the metadata key "imagic" with the settings,
the base model's identity, the input image's hash, the losses and how each stage ended.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import StateMismatchError
from .families import Embedding

FORMAT = "imagic-edit-state"
FORMAT_VERSION = 1


@dataclass
class EditState:
    """A trained edit. `method` is "full", "lora", or "none" (fine-tuning did not run)."""

    target_text: str
    e_tgt: Embedding
    e_opt: Embedding
    method: str
    weights: dict[str, torch.Tensor]
    settings: dict
    base_model: dict
    image_sha256: str
    height: int
    width: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "done" / "nan at step k" / ...
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(status == "done" for status in self.stages.values()) and len(self.stages) == 2

    def _header(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "target_text": self.target_text, "method": self.method,
            "settings": self.settings, "base_model": self.base_model, "image_sha256": self.image_sha256,
            "height": self.height, "width": self.width, "losses": self.losses, "stages": self.stages,
            "timings": self.timings,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state; the caller decides about overwriting (see image_io.check_outputs_free)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for prefix, group in (("e_tgt", self.e_tgt), ("e_opt", self.e_opt), ("weights", self.weights)):
            tensors.update({f"{prefix}.{name}": t.detach().cpu().contiguous() for name, t in group.items()})
        save_file(tensors, str(path), metadata={"imagic": json.dumps(self._header())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EditState":
        path = Path(path)
        if not path.is_file():
            raise StateMismatchError(f"no edit state file at '{path}': train one with 'imagic train' first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise StateMismatchError(f"'{path}' is not a readable safetensors file: {error}") from None
        header = json.loads(metadata.get("imagic", "{}"))
        if header.get("format") != FORMAT:
            raise StateMismatchError(f"'{path}' is not an imagic edit state (no imagic header)")
        if header["version"] > FORMAT_VERSION:
            raise StateMismatchError(f"'{path}' was written by a newer imagic (state version {header['version']})")
        groups: dict[str, dict[str, torch.Tensor]] = {"e_tgt": {}, "e_opt": {}, "weights": {}}
        for key, tensor in tensors.items():
            prefix, name = key.split(".", 1)
            groups[prefix][name] = tensor
        return cls(
            target_text=header["target_text"], e_tgt=groups["e_tgt"], e_opt=groups["e_opt"], method=header["method"],
            weights=groups["weights"], settings=header["settings"], base_model=header["base_model"],
            image_sha256=header["image_sha256"], height=header["height"], width=header["width"],
            losses=header["losses"], stages=header["stages"], timings=header.get("timings", {}),
        )


def model_identity(family) -> dict:
    """Who the base model is: its family, denoiser config, and a probe of its weights.

    The probe (the mean of a strided sample of every parameter) tells models apart yet
    survives loading the same weights in fp16, bf16 or fp32.
    """
    denoiser = family.denoiser
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    probe = []
    with torch.no_grad():
        for param in denoiser.parameters():
            flat = param.detach().reshape(-1)
            probe.append(flat[:: max(1, flat.numel() // 64)].float().mean().item())
    return {
        "family": family.name,
        "name": str(getattr(family.pipe, "name_or_path", "") or ""),
        "denoiser_config": json.loads(json.dumps(config, default=str)),
        "probe": probe,
    }


def check_same_model(state: EditState, identity: dict) -> None:
    """Refuse a state trained on another base model."""
    expected = state.base_model
    trained_on = expected.get("name") or "another model"
    if expected["family"] != identity["family"] or expected["denoiser_config"] != identity["denoiser_config"]:
        raise StateMismatchError(
            f"this edit state was trained on a different model architecture ({trained_on}): load that model to sample it"
        )
    probe, current = torch.tensor(expected["probe"]), torch.tensor(identity["probe"])
    if probe.shape != current.shape or not torch.allclose(probe, current, rtol=2e-2, atol=1e-3):
        raise StateMismatchError(
            f"this edit state was trained on different weights ({trained_on}): load that model to sample it"
        )
