"""The edit state file: everything needed to sample an edit again without retraining.

One safetensors file: tensors `e_tgt.*`, `e_opt.*`, `weights.<level>.*` (per level of the model family,
the LoRA matrices or the full fine-tuned denoiser) and `text_extras.*` (what travels beside the target
text's embedding, e.g. an attention mask), and a JSON header under the metadata key "imagic" with the
settings, the family's levels, the base model's identity, the input image's hash, the losses and how each
stage ended (stage 2 of a level above the base is "fine_tune.<level>"). Both come from one list, the
fields of `EditState`: those marked as tensors are tensor groups, the others the header's fields.
"""

import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import SettingsError, StateMismatchError
from .families import Embedding, Text
from .identity import PROBE_LENGTHS
from .inputs import check_regular
from .masks import AUTO
from .outputs import write_atomic
from .settings import MAX_SIDE, NO_MASK, SampleSettings, TrainSettings, check_sampling

FORMAT = "imagic-edit-state"
FORMAT_VERSION = 5  # 2: the model identity covers every component; 3: weights per level; 4: what sampling needs;
# 5: the identity's probes see weights that changed places (identity.py)
SINGLE_LEVEL = "unet"  # the one level of the families that version 2 knew (Stable Diffusion, SDXL)
_TENSORS = {"tensors": "by name"}  # a field saved as tensors "<field>.<name>"
_TENSORS_BY_LEVEL = {"tensors": "by level"}  # saved as "<field>.<level>.<name>"


@dataclass
class EditState:
    """A trained edit. `method` is "full", "lora", or "none" (fine-tuning did not run). `weights`: per level name
    (`levels`, the family's, base first), the trained tensors by name; a level left as loaded has none.
    `text_extras`: what the family's text encoder gives beside the target text's embedding (both e_tgt and
    e_opt travel with it). What sampling needs to give the edit's images again anywhere: `photo`, the photo
    trained on ("pixels": its fitted pixels, uint8 [H, W, 3]), `sampling`, the SampleSettings (as a dict) the
    edit was shown with, and `super_resolution`, the cascade's super-resolution model it was trained with."""

    target_text: str
    e_tgt: Embedding = field(metadata=_TENSORS)
    e_opt: Embedding = field(metadata=_TENSORS)
    method: str
    weights: dict[str, dict[str, torch.Tensor]] = field(metadata=_TENSORS_BY_LEVEL)
    settings: TrainSettings
    base_model: dict
    image_sha256: str
    height: int
    width: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "done" / "nan at step k" / ...
    timings: dict[str, float] = field(default_factory=dict)
    levels: list[str] = field(default_factory=lambda: [SINGLE_LEVEL])
    text_extras: dict[str, torch.Tensor] = field(default_factory=dict, metadata=_TENSORS)
    sampling: dict = field(default_factory=dict)
    super_resolution: str = ""
    photo: dict[str, torch.Tensor] = field(default_factory=dict, metadata=_TENSORS)

    @property
    def complete(self) -> bool:
        return {"embedding", "fine_tune"} <= set(self.stages) and all(s == "done" for s in self.stages.values())

    @property
    def stopped_early(self) -> dict[str, int]:
        """The stages that the reconstruction check ended early (StageSettings.stop_ratio), each with the steps it ran:
        a stage that finished ("done") with fewer losses, one per step, than its settings' steps."""
        limits = {"embedding": self.settings.embedding.steps}
        for level in self.levels:
            limits[fine_tune_stage(self.levels, level)] = self.settings.fine_tune_of(level, level == self.levels[0]).steps
        ran = {stage: len(self.losses.get(stage, [])) for stage, status in self.stages.items() if status == "done"}
        return {stage: steps for stage, steps in ran.items() if steps < limits.get(stage, 0)}

    @property
    def photo_image(self) -> Image.Image | None:
        """The photo the edit was trained on, fitted, if the state carries it (version 4 on)."""
        pixels = self.photo.get("pixels")
        return None if pixels is None else Image.fromarray(pixels.numpy(), "RGB")

    @property
    def target(self) -> Text:
        """e_tgt with what travels beside it."""
        return Text(self.e_tgt, self.text_extras)

    def _header(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata}
        return {"format": FORMAT, "version": FORMAT_VERSION, **values, "settings": self.settings.to_dict()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for group in (f for f in fields(self) if f.metadata):
            values = getattr(self, group.name)
            named = ({f"{level}.{name}": t for level, level_tensors in values.items() for name, t in level_tensors.items()}
                     if group.name in _BY_LEVEL else values)
            tensors.update({f"{group.name}.{name}": t.detach().cpu().contiguous() for name, t in named.items()})
        return tensors

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the state atomically (a reader never sees half of it); `overwrite=False` keeps an existing file."""
        tensors, metadata = self._tensors(), {"imagic": json.dumps(self._header())}
        return write_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EditState":
        """Read a state file as untrusted input: its header and its tensors' names, shapes and dtypes are
        checked (check_header, check_layout) before any tensor is read; any mismatch is a one-line
        StateMismatchError."""
        path = Path(path)
        if not os.path.lexists(path):
            raise StateMismatchError(f"no edit state file at '{path}': train one with 'imagic train' first")
        check_regular(path, "edit state", StateMismatchError)
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
            tensors = {rename(key): tensor for key, tensor in load_file(str(path)).items()}
        except (SafetensorError, OSError, ValueError) as error:
            raise StateMismatchError(f"'{path}' is not a readable safetensors file: {error}") from None
        try:
            check_values(tensors)
        except StateMismatchError as error:
            raise StateMismatchError(f"'{path}' {error}") from None
        state = cls(**_fields_from(header), **_groups_from(tensors, header["levels"]))
        state.sampling = _mask_beside(state.sampling, path.parent)
        return state


def _mask_beside(sampling: dict, folder: Path) -> dict:
    """A mask picture recorded by a relative path is the file of that name beside the state: the web app records
    'mask.png', the picture it gives for download with the state, not its own temporary path."""
    mask = sampling.get("mask")
    if mask in (None, NO_MASK, AUTO) or os.path.isabs(mask):
        return sampling
    return {**sampling, "mask": str(folder / mask)}


def model_of_state_file(path: str | os.PathLike) -> str | None:
    """The base model a state file names, from its header alone (nothing checked, no tensor read); None where the
    file says none or cannot be read."""
    try:
        check_regular(path, "edit state", StateMismatchError)
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("imagic") or "{}")
        name = header.get("base_model", {}).get("name")
    except (SafetensorError, OSError, ValueError, AttributeError, RecursionError, StateMismatchError):
        return None
    return name if isinstance(name, str) and 0 < len(name) <= MAX_NAME else None


_GROUPS = tuple(f.name for f in fields(EditState) if f.metadata)  # the tensor groups, by field name
_BY_LEVEL = {f.name for f in fields(EditState) if f.metadata.get("tensors") == _TENSORS_BY_LEVEL["tensors"]}


def _fields_from(header: dict) -> dict:
    values = {f.name: header[f.name] for f in fields(EditState) if not f.metadata}
    return {**values, "settings": TrainSettings.from_dict(header["settings"])}


def _groups_from(tensors: dict[str, torch.Tensor], levels: list[str]) -> dict:
    groups: dict[str, dict] = {group: {} for group in _GROUPS}
    for key, tensor in tensors.items():
        group, name = key.split(".", 1)
        if group in _BY_LEVEL:
            level, name = name.split(".", 1)
            groups[group].setdefault(level, {})[name] = tensor
        else:
            groups[group][name] = tensor
    for group in _BY_LEVEL:
        groups[group] = {level: groups[group][level] for level in levels if level in groups[group]}
    return groups


def check_fits(state: EditState, target: Text, size: tuple[int, int]) -> None:
    """What only the loaded model can tell: embeddings of the shapes its text encoder gives the state's target
    text (`target`), finite, and the image size its settings imply. (The weights are checked as the denoiser is
    rebuilt.)"""
    for group in ("e_tgt", "e_opt"):
        tensors = getattr(state, group)
        if set(tensors) != set(target.embedding):
            raise StateMismatchError(f"the edit state's {group} holds {sorted(tensors)}, this model's embedding "
                                     f"{sorted(target.embedding)}: load the model it was trained on")
        for name, tensor in tensors.items():
            expected = tuple(target.embedding[name].shape)
            if tuple(tensor.shape) != expected:
                raise StateMismatchError(f"the edit state's {group}.{name} is {list(tensor.shape)}, this model's text "
                                         f"encoder gives {list(expected)}: load the model it was trained on")
            if not torch.isfinite(tensor).all():
                raise StateMismatchError(f"the edit state's {group}.{name} holds NaN or infinite values: train it again")
    if set(state.text_extras) != set(target.extras):
        raise StateMismatchError(f"the edit state's text extras are {sorted(state.text_extras)}, this model's text "
                                 f"encoder gives {sorted(target.extras)}: load the model it was trained on")
    if (state.height, state.width) != tuple(size):
        raise StateMismatchError(f"the edit state's size {state.height}x{state.width} is not the {size[0]}x{size[1]} "
                                 "its settings give on this model: train it again")


def _json_type(annotation) -> type:
    """The JSON type a header field is stored as: its container (dict, list) or plain type; settings as a dict."""
    return dict if annotation is TrainSettings else typing.get_origin(annotation) or annotation


# The header's fields and their JSON types; a field missing, extra or of another type is refused.
_HEADER_TYPES = {"format": str, "version": int,
                 **{f.name: _json_type(f.type) for f in fields(EditState) if not f.metadata}}
_BASE_MODEL_TYPES = {"family": str, "name": str, "denoiser_config": dict, "components": dict}
_WEIGHT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_DEPTH = 16  # the header's own nesting is 7 deep (base_model.components.<name>.probe[i][j])
MAX_HEADER_TEXT = 1 << 20  # characters in any one string (the target text included)
MAX_NAME = 4096  # a model's name or path: the longest path Linux takes
MAX_STATE_VALUE = 65504.0  # fp16's largest finite value


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
    except RecursionError:  # Python's JSON parser gives up on deep nesting this way
        raise StateMismatchError(f"has an imagic header nested over {MAX_HEADER_DEPTH} deep") from None
    _check_bounded(header)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateMismatchError("is not an imagic edit state (no imagic header)")
    version = header.get("version")
    if _typed(version, int) and version > FORMAT_VERSION:
        raise StateMismatchError(f"was written by a newer imagic (state version {version})")
    if _typed(version, int) and version in (2, 3):  # what version 4 added: none of it
        header = {"sampling": {}, "super_resolution": "", **header}
    if _typed(version, int) and version == 2 and "levels" not in header:  # one level, named as version 3 names it
        header = {**header, "levels": [SINGLE_LEVEL]}
    elif _typed(version, int) and version < 2:
        raise StateMismatchError(f"was written by an older imagic (state version {version}), whose model identity "
                                 "covered the UNet only: train the edit again")
    _check_fields("", header, _HEADER_TYPES)
    levels = header["levels"]
    if not levels or not all(isinstance(n, str) and n.isidentifier() for n in levels) or len(set(levels)) != len(levels):
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
    if len(header["super_resolution"]) > MAX_NAME:
        raise StateMismatchError("has a header field 'super_resolution' longer than any model's name or path")
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
    try:
        check_sampling([1.0], [0], SampleSettings(**header["sampling"]))
    except SettingsError as error:
        raise StateMismatchError(f"has invalid sampling settings in its header: {error}") from None
    except TypeError:
        raise StateMismatchError("has a header field 'sampling' that does not hold imagic's sampling settings") from None
    return header


def _check_bounded(value) -> None:
    """The header's nesting depth and its strings' lengths, checked without recursion before any field is read."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_HEADER_DEPTH:
            raise StateMismatchError(f"has an imagic header nested over {MAX_HEADER_DEPTH} deep")
        if isinstance(item, str) and len(item) > MAX_HEADER_TEXT:
            raise StateMismatchError(f"has a header text of {len(item):,} characters, over {MAX_HEADER_TEXT:,}")
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            pending += [(key, depth + 1), (child, depth + 1)]


def _check_base_model(base_model: dict) -> None:
    _check_fields("base_model.", base_model, _BASE_MODEL_TYPES)
    if len(base_model["name"]) > MAX_NAME:
        raise StateMismatchError(f"has a header field 'base_model.name' of {len(base_model['name']):,} characters: "
                                 "no model's name or path is that long")
    for name, component in base_model["components"].items():
        probe = component.get("probe") if isinstance(component, dict) else None
        valid = (isinstance(component, dict) and set(component) == {"config_sha256", "probe"}
                 and isinstance(component["config_sha256"], str) and isinstance(probe, list)
                 and all(isinstance(p, list) and len(p) in PROBE_LENGTHS and all(_typed(v, float) for v in p)
                         for p in probe))
        if not valid:
            raise StateMismatchError(f"has a header field 'base_model.components.{name}' that is not a model identity")


def check_layout(header: dict, layout: dict[str, tuple[list[int], str]]) -> None:
    """The tensors' names, shapes and dtypes (read from the file's index, nothing loaded) against the header."""
    groups: dict[str, dict[str, tuple[list[int], str]]] = {group: {} for group in _GROUPS}
    for key, (shape, dtype) in layout.items():
        prefix, _, name = key.partition(".")
        level, _, level_name = name.partition(".")
        if prefix not in groups or not name or (prefix in _BY_LEVEL and (level not in header["levels"] or not level_name)):
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
    _check_trained_levels(header, {name.split(".")[0] for name in weights})
    for name, (shape, dtype) in weights.items():
        if dtype not in _WEIGHT_DTYPES:
            raise StateMismatchError(f"has a weight tensor 'weights.{name}' of dtype {dtype}, not a float")
        if method == "lora":
            _check_lora_shape(name, shape, header["settings"]["lora_rank"])
    for name, (_, dtype) in groups["text_extras"].items():
        if dtype not in (*_WEIGHT_DTYPES, "I64", "I32", "BOOL"):
            raise StateMismatchError(f"has a text extra 'text_extras.{name}' of dtype {dtype}")
    photo = groups["photo"]
    if photo and (set(photo) != {"pixels"} or photo["pixels"] != ([header["height"], header["width"], 3], "U8")):
        raise StateMismatchError(f"has a photo that is not {header['height']}x{header['width']} RGB pixels")


def _check_trained_levels(header: dict, with_weights: set[str]) -> None:
    """A level whose fine-tuning the header records has its weights, and only such a level has any."""
    if header["method"] == "none":
        return
    levels = header["levels"]
    for level in levels:
        recorded = fine_tune_stage(levels, level) in header["stages"]
        if recorded != (level in with_weights):
            what = "no weight tensors for" if recorded else "weight tensors but no fine-tuning record for"
            raise StateMismatchError(f"has {what} its level '{level}'")


def check_values(tensors: dict[str, torch.Tensor]) -> None:
    """Every float tensor finite and within fp16's range, what every supported model can sample in: a weight or
    embedding beyond it becomes infinite in fp16, and long before that gives black images."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        largest = tensor.detach().abs().max().item()
        if not largest <= MAX_STATE_VALUE:  # NaN fails too
            shown = "NaN or infinite values" if not math.isfinite(largest) else f"a value of {largest:.3g}"
            raise StateMismatchError(f"has {shown} in '{name}', beyond the {MAX_STATE_VALUE:g} any trained edit stays "
                                     "within: train it again")


def _check_lora_shape(name: str, shape: list[int], rank: int) -> None:
    # peft's layout: lora_A is [rank, in, ...], lora_B is [out, rank, ...]; the header's rank must be theirs.
    axis = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if axis is None:
        raise StateMismatchError(f"has a weight tensor 'weights.{name}' that is not a LoRA matrix")
    if len(shape) <= axis or shape[axis] != rank:
        raise StateMismatchError(f"has a LoRA tensor 'weights.{name}' of shape {shape}, not of the header's rank {rank}")
