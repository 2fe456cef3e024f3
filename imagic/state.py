"""The edit state file: everything needed to sample an edit again without retraining.

One safetensors file: tensors `e_tgt.*`, `e_opt.*` and `weights.<level>.*` (per level of the model
family, the LoRA matrices or the full fine-tuned denoiser), and a JSON header under the metadata key
"imagic" with the settings, the family's levels, the base model's identity, the input image's hash,
the losses and how each stage ended (stage 2 of a level above the base is "fine_tune.<level>").
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import SettingsError, StateMismatchError
from .families import Embedding
from .outputs import write_atomic
from .settings import MAX_SIDE, TrainSettings

FORMAT = "imagic-edit-state"
FORMAT_VERSION = 3  # 2: the model identity covers every component; 3: weights per level
SINGLE_LEVEL = "unet"  # the one level of the families that version 2 knew (Stable Diffusion, SDXL)


@dataclass
class EditState:
    """A trained edit. `method` is "full", "lora", or "none" (fine-tuning did not run). `weights`: per level name
    (`levels`, the family's, base first), the trained tensors by name; a level left as loaded has none."""

    target_text: str
    e_tgt: Embedding
    e_opt: Embedding
    method: str
    weights: dict[str, dict[str, torch.Tensor]]
    settings: dict
    base_model: dict
    image_sha256: str
    height: int
    width: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "done" / "nan at step k" / ...
    timings: dict[str, float] = field(default_factory=dict)
    levels: list[str] = field(default_factory=lambda: [SINGLE_LEVEL])

    @property
    def complete(self) -> bool:
        return {"embedding", "fine_tune"} <= set(self.stages) and all(s == "done" for s in self.stages.values())

    def _header(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "target_text": self.target_text, "method": self.method,
            "settings": self.settings, "base_model": self.base_model, "image_sha256": self.image_sha256,
            "height": self.height, "width": self.width, "losses": self.losses, "stages": self.stages,
            "timings": self.timings, "levels": self.levels,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the state atomically (a reader never sees half of it); `overwrite=False` keeps an existing file."""
        groups = [("e_tgt", self.e_tgt), ("e_opt", self.e_opt)]
        groups += [(f"weights.{level}", weights) for level, weights in self.weights.items()]
        tensors = {}
        for prefix, group in groups:
            tensors.update({f"{prefix}.{name}": t.detach().cpu().contiguous() for name, t in group.items()})
        metadata = {"imagic": json.dumps(self._header())}
        return write_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EditState":
        """Read a state file as untrusted input: its header and its tensors' names, shapes and dtypes are
        checked (state_schema) before any tensor is read; any mismatch is a one-line StateMismatchError."""
        path = Path(path)
        if not path.is_file():
            raise StateMismatchError(f"no edit state file at '{path}': train one with 'imagic train' first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                layout = {key: (handle.get_slice(key).get_shape(), handle.get_slice(key).get_dtype())
                          for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise StateMismatchError(f"'{path}' is not a readable safetensors file: {error}") from None
        try:
            header = check_header(metadata.get("imagic"))
            rename = _version_2_names if header["version"] == 2 else (lambda key: key)
            layout = {rename(key): value for key, value in layout.items()}
            check_layout(header, layout)
        except StateMismatchError as error:
            raise StateMismatchError(f"'{path}' {error}") from None
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise StateMismatchError(f"'{path}' is not a readable safetensors file: {error}") from None
        groups: dict[str, dict[str, torch.Tensor]] = {"e_tgt": {}, "e_opt": {}}
        weights: dict[str, dict[str, torch.Tensor]] = {level: {} for level in header["levels"]}
        for key, tensor in tensors.items():
            prefix, name = rename(key).split(".", 1)
            if prefix == "weights":
                level, name = name.split(".", 1)
                weights[level][name] = tensor
            else:
                groups[prefix][name] = tensor
        return cls(
            target_text=header["target_text"], e_tgt=groups["e_tgt"], e_opt=groups["e_opt"], method=header["method"],
            weights={level: tensors for level, tensors in weights.items() if tensors}, settings=header["settings"],
            base_model=header["base_model"], image_sha256=header["image_sha256"], height=header["height"],
            width=header["width"], losses=header["losses"], stages=header["stages"], timings=header["timings"],
            levels=header["levels"],
        )


def check_fits(state: EditState, embedding: Embedding, size: tuple[int, int]) -> None:
    """What only the loaded model can tell: embeddings of its text encoder's shape, finite, and the
    image size its settings imply. (The weights are checked as the denoiser is rebuilt.)"""
    for group in ("e_tgt", "e_opt"):
        tensors = getattr(state, group)
        if set(tensors) != set(embedding):
            raise StateMismatchError(f"the edit state's {group} holds {sorted(tensors)}, this model's embedding "
                                     f"{sorted(embedding)}: load the model it was trained on")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(embedding[name].shape):
                raise StateMismatchError(f"the edit state's {group}.{name} is {list(tensor.shape)}, this model's text "
                                         f"encoder gives {list(embedding[name].shape)}: load the model it was trained on")
            if not torch.isfinite(tensor).all():
                raise StateMismatchError(f"the edit state's {group}.{name} holds NaN or infinite values: train it again")
    if (state.height, state.width) != tuple(size):
        raise StateMismatchError(f"the edit state's size {state.height}x{state.width} is not the {size[0]}x{size[1]} "
                                 "its settings give on this model: train it again")


# The header's fields and their JSON types; a field missing, extra or of another type is refused.
_HEADER_TYPES = {
    "format": str, "version": int, "target_text": str, "method": str, "settings": dict, "base_model": dict,
    "image_sha256": str, "height": int, "width": int, "losses": dict, "stages": dict, "timings": dict,
    "levels": list,
}
_BASE_MODEL_TYPES = {"family": str, "name": str, "denoiser_config": dict, "components": dict}
_WEIGHT_DTYPES = ("F32", "F16", "BF16")


def fine_tune_stage(levels: list[str], level: str) -> str:
    """A level's stage 2 in a state's stages, losses and timings: "fine_tune" for the base (the first level),
    "fine_tune.<level>" above it."""
    return "fine_tune" if level == levels[0] else f"fine_tune.{level}"


def _version_2_names(key: str) -> str:
    """A version 2 file's tensor name as version 3 names it: its weights were its one level's."""
    return f"weights.{SINGLE_LEVEL}.{key.removeprefix('weights.')}" if key.startswith("weights.") else key




def _typed(value, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_fields(what: str, data: dict, types: dict[str, type]) -> None:
    for key in types:
        if key not in data:
            raise StateMismatchError(f"has no '{what}{key}' in its header: not an intact imagic edit state")
    for key, value in data.items():
        if key not in types:
            raise StateMismatchError(f"has an unknown header field '{what}{key}': not an intact imagic edit state")
        if not _typed(value, types[key]):
            raise StateMismatchError(f"has a header field '{what}{key}' of the wrong type ({type(value).__name__})")


def check_header(text: str | None) -> dict:
    """The imagic header, parsed and checked against its schema; raises StateMismatchError naming the field."""
    if text is None:
        raise StateMismatchError("is not an imagic edit state (no imagic header)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        raise StateMismatchError("has an imagic header that is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateMismatchError("is not an imagic edit state (no imagic header)")
    version = header.get("version")
    if _typed(version, int) and version > FORMAT_VERSION:
        raise StateMismatchError(f"was written by a newer imagic (state version {version})")
    if _typed(version, int) and version == 2 and "levels" not in header:  # one level, named as version 3 names it
        header = {**header, "levels": [SINGLE_LEVEL]}
    elif _typed(version, int) and version < 2:
        raise StateMismatchError(f"was written by an older imagic (state version {version}), whose model identity "
                                 "covered the UNet only: train the edit again")
    _check_fields("", header, _HEADER_TYPES)
    levels = header["levels"]
    if not levels or len(set(levels)) != len(levels) or not all(isinstance(n, str) and n.isidentifier() for n in levels):
        raise StateMismatchError("has a header field 'levels' that is not a list of distinct level names")
    stage_names = {"embedding", *(fine_tune_stage(levels, level) for level in levels)}
    if header["method"] not in ("full", "lora", "none"):
        raise StateMismatchError(f"has an unknown method {header['method']!r} in its header")
    sha = header["image_sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise StateMismatchError("has a header field 'image_sha256' that is not a SHA-256 in hex")
    for key in ("height", "width"):
        if not 1 <= header[key] <= MAX_SIDE:
            raise StateMismatchError(f"has a header field '{key}' of {header[key]}, outside 1 to {MAX_SIDE}")
    for key, values in header["losses"].items():
        if key not in stage_names or not isinstance(values, list) or not all(_typed(v, float) for v in values):
            raise StateMismatchError(f"has a header field 'losses.{key}' that is not a stage's list of losses")
    for key, status in header["stages"].items():
        if key not in stage_names or not isinstance(status, str):
            raise StateMismatchError(f"has a header field 'stages.{key}' that is not a stage's status")
    for key, seconds in header["timings"].items():
        if not _typed(seconds, float):
            raise StateMismatchError(f"has a header field 'timings.{key}' that is not a number")
    _check_base_model(header["base_model"])
    try:
        settings = TrainSettings.from_dict(header["settings"])
    except SettingsError as error:
        raise StateMismatchError(f"has invalid settings in its header: {error}") from None
    except (TypeError, KeyError, AttributeError):
        raise StateMismatchError("has a header field 'settings' that does not hold imagic's training settings") from None
    if header["method"] != "none" and header["method"] != settings.method:
        raise StateMismatchError(f"has method {header['method']!r} but settings for {settings.method!r}")
    return header


def _check_base_model(base_model: dict) -> None:
    _check_fields("base_model.", base_model, _BASE_MODEL_TYPES)
    for name, component in base_model["components"].items():
        probe = component.get("probe") if isinstance(component, dict) else None
        valid = (isinstance(component, dict) and set(component) == {"config_sha256", "probe"}
                 and isinstance(component["config_sha256"], str) and isinstance(probe, list)
                 and all(isinstance(p, list) and len(p) == 4 and all(_typed(v, float) for v in p) for p in probe))
        if not valid:
            raise StateMismatchError(f"has a header field 'base_model.components.{name}' that is not a model identity")


def check_layout(header: dict, layout: dict[str, tuple[list[int], str]]) -> None:
    """The tensors' names, shapes and dtypes (read from the file's index, nothing loaded) against the header."""
    groups: dict[str, dict[str, tuple[list[int], str]]] = {"e_tgt": {}, "e_opt": {}, "weights": {}}
    for key, (shape, dtype) in layout.items():
        prefix, _, name = key.partition(".")
        if prefix not in groups or not name or (prefix == "weights" and name.split(".")[0] not in header["levels"]):
            raise StateMismatchError(f"holds a tensor '{key}' that is not part of an edit state of levels "
                                     f"{', '.join(header['levels'])}")
        groups[prefix][name] = (shape, dtype)
    if any(dtype != "F32" for group in ("e_tgt", "e_opt") for _, dtype in groups[group].values()):
        raise StateMismatchError("has e_tgt / e_opt tensors that are not float32")
    if not groups["e_tgt"] or groups["e_tgt"] != groups["e_opt"]:
        raise StateMismatchError("has e_tgt and e_opt tensors that are missing or of different names or shapes")
    weights, method = groups["weights"], header["method"]
    if (method == "none") != (not weights):
        raise StateMismatchError(f"has {len(weights)} weight tensors for method {method!r}")
    for name, (shape, dtype) in weights.items():
        if dtype not in _WEIGHT_DTYPES:
            raise StateMismatchError(f"has a weight tensor 'weights.{name}' of dtype {dtype}, not a float")
        if method == "lora":
            _check_lora_shape(name, shape, header["settings"]["lora_rank"])


def _check_lora_shape(name: str, shape: list[int], rank: int) -> None:
    # peft's layout: lora_A is [rank, in, ...], lora_B is [out, rank, ...]; the header's rank must be theirs.
    axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if axis is None:
        raise StateMismatchError(f"has a weight tensor 'weights.{name}' that is not a LoRA matrix")
    if len(shape) <= axis or shape[axis] != rank:
        raise StateMismatchError(f"has a LoRA tensor 'weights.{name}' of shape {shape}, not of the header's rank {rank}")


# Config entries that differ between loads of the same model (dtype, versions, where it came from).
_VOLATILE_CONFIG = {"torch_dtype", "dtype", "transformers_version", "architectures"}  # save_pretrained sets the last


def _config_digest(config: dict) -> str:
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _component_config(component) -> dict:
    if hasattr(component, "get_vocab"):  # a tokenizer: its vocabulary is what the edit depends on
        return {"vocab": sorted(component.get_vocab().items()), "max_length": component.model_max_length}
    config = getattr(component, "config", None)
    if config is None and hasattr(component, "to_dict"):  # an image processor
        return component.to_dict()
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


@torch.no_grad()
def _tensor_probe(tensor: torch.Tensor) -> list[float]:
    """[mean, rms, alternating mean, count] over every element, in float64.

    Every weight counts (a change anywhere moves the statistics), one pass per tensor, and the
    values survive loading the same weights in fp16, bf16 or fp32 (see _probes_match).
    """
    flat = tensor.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.double()
    count = flat.numel()
    if count == 0:
        return [0.0, 0.0, 0.0, 0.0]
    total = flat.sum(dtype=torch.float64).item()
    rms = torch.linalg.vector_norm(flat, dtype=torch.float64).item() / math.sqrt(count)
    alternating = (flat[0::2].sum(dtype=torch.float64) - flat[1::2].sum(dtype=torch.float64)).item()
    return [total / count, rms, alternating / count, float(count)]


def _probes_match(trained: list[list[float]], current: list[list[float]]) -> int | None:
    """The index of the first tensor that differs, or None.

    bf16 rounds each weight by at most 2^-9 of itself, so each statistic moves by at most that much of
    the rms, and for n random roundings by about 2^-9 / sqrt(n): the tolerance allows 8 times that.
    """
    for index, (a, b) in enumerate(zip(trained, current)):
        if a[3] != b[3]:
            return index
        scale = max(a[1], b[1]) * (2**-6 / math.sqrt(max(a[3], 1.0)) + 2**-12) + 1e-12
        if any(abs(x - y) > scale for x, y in zip(a[:3], b[:3])):
            return index
    return None


def model_identity(family) -> dict:
    """Who the base model is: its family, and per pipeline component (denoiser, VAE, text encoder,
    tokenizer, scheduler, ...) a hash of its config and, for networks, a probe of every weight."""
    denoiser = family.base.denoiser
    components = {}
    for name, component in sorted(family.components.items()):
        if component is None:
            continue
        probe = []
        if isinstance(component, torch.nn.Module):
            probe = [_tensor_probe(t) for t in component.state_dict().values()]
        components[name] = {"config_sha256": _config_digest(_component_config(component)), "probe": probe}
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    return {
        "family": family.name,
        "name": str(getattr(family.pipe, "name_or_path", "") or ""),  # the base pipeline's
        "denoiser_config": json.loads(json.dumps(config, default=str)),
        "components": components,
    }


def check_same_model(state: EditState, identity: dict, tensor_names: dict[str, list[str]] | None = None) -> None:
    """Refuse a state trained on another base model, naming the component that differs."""
    expected = state.base_model
    trained_on = expected.get("name") or "another model"
    if expected["family"] != identity["family"] or expected["denoiser_config"] != identity["denoiser_config"]:
        raise StateMismatchError(
            f"this edit state was trained on a different model architecture ({trained_on}): load that model to sample it"
        )
    trained, current = expected["components"], identity["components"]
    for name in sorted(set(trained) | set(current)):
        if name not in trained or name not in current or trained[name]["config_sha256"] != current[name]["config_sha256"]:
            raise StateMismatchError(
                f"this edit state was trained on a model with another {name} ({trained_on}): load that model to sample it"
            )
        a, b = trained[name]["probe"], current[name]["probe"]
        differs = 0 if len(a) != len(b) else _probes_match(a, b)
        if differs is not None:
            names = (tensor_names or {}).get(name, [])
            where = f" at {names[differs]}" if differs < len(names) else ""
            raise StateMismatchError(
                f"this edit state was trained on different weights ({trained_on}: its {name} differs{where}): "
                "load that model to sample it"
            )
