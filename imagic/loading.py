"""Loading a model: a local diffusers folder, a single-file checkpoint, or a hub id.

Nothing here waits on a network that is not there: a hub id is looked up in the local cache first,
and when it is missing and the hub is unreachable the error comes at once, not after retries.
"""

import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import diffusers
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError
from huggingface_hub import constants
from safetensors import SafetensorError, safe_open

from .defaults import STABLE_DIFFUSION, ModelDefaults, folder_defaults
from .errors import ModelLoadError, SettingsError
from .families import CASCADES, FAMILIES, family_class

# The built-in shapes model: a pipeline folder inside the package, loaded by this name.
BUILTIN_NAME = "shapes"
BUILTIN_FOLDER = Path(__file__).parent / "shapes" / "model"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# Which pipeline an original single-file checkpoint is, by a part of its tensors' names only that family's have
# (e.g. SDXL's second text encoder, SD3's joint blocks, FLUX's double blocks); Stable Diffusion's otherwise.
SINGLE_FILE_MARKERS = tuple((family.single_file_marker, name) for name, family in FAMILIES if family.single_file_marker)
SINGLE_FILE_PIPELINES = ("StableDiffusionPipeline", *(name for _, name in SINGLE_FILE_MARKERS))
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# What a missing, corrupt or unsupported model raises from inside diffusers, transformers and safetensors
# (AttributeError: a pipeline class in model_index.json that this diffusers does not have).
MAX_NAME = 4096  # the longest path Linux takes
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, AttributeError, SafetensorError, SingleFileComponentError)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name: str | torch.device | None) -> torch.device:
    """The device named (default: default_device()), refused in one line unless this torch computes on it here:
    a CUDA device without CUDA, an index past the last GPU, "meta" (which holds no data), or no device at all."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise SettingsError(f"unknown device {str(name)!r}: give cpu, cuda or cuda:N") from None
    usable = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
              "mps": lambda: torch.backends.mps.is_available(),
              "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    if device.type not in usable or not usable[device.type]():
        here = "cpu, cuda or cuda:N" if torch.cuda.is_available() else "cpu (this torch sees no CUDA GPU)"
        raise SettingsError(f"device {str(name)!r} cannot run imagic here: give {here}")
    count = torch.cuda.device_count() if device.type == "cuda" else None
    if count is not None and device.index is not None and device.index >= count:
        raise SettingsError(f"device {str(name)!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def default_dtype(device: torch.device, defaults: ModelDefaults) -> torch.dtype:
    """fp32 on the CPU (bf16 there is ~20x slower); on a GPU the model's own, bf16 falling back to fp16 where the
    GPU lacks it."""
    if device.type == "cpu":
        return torch.float32
    if defaults.gpu_dtype == "bf16" and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _builtin(model: str | os.PathLike | None) -> bool:
    return str(model) == BUILTIN_NAME and not Path(BUILTIN_NAME).exists()


def _is(test: Callable[[Path], bool], path: Path) -> bool:
    """A file test that is False instead of an error for a path the file system cannot hold (too long a name)."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def model_defaults(model: str | os.PathLike | None, family_defaults: ModelDefaults) -> ModelDefaults:
    """One model's defaults: those its folder carries (the built-in model's measured ones), else its family's."""
    folder = BUILTIN_FOLDER if _builtin(model) else Path(str(model or "")).expanduser()
    return (folder_defaults(folder) if str(model or "") and _is(Path.is_dir, folder) else None) or family_defaults


def defaults_before_loading(model: str | os.PathLike | None) -> ModelDefaults:
    """A model's defaults from its files, before it loads (the command line fills options in first): those its
    folder carries; else its family's, by the pipeline it is (`_pipeline_class_name`); else Stable Diffusion's."""
    name = str(model or BUILTIN_NAME)
    family = None if _builtin(name) else family_class(_pipeline_class_name(name))
    return model_defaults(name, family.defaults if family is not None else STABLE_DIFFUSION)


def _pipeline_class_name(model: str) -> str:
    """The pipeline class a model is, without loading it: a folder's model_index.json, a .safetensors file's
    tensor names, a hub id's index in the local cache; "" where none says (loading will say what is wrong)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text())
        elif path.suffix.lower() == ".safetensors" and path.is_file():
            return _single_file_pipeline(path, None).__name__
        elif not is_local_model(model):
            with warnings.catch_warnings():  # huggingface_hub's deprecation notices about arguments diffusers passes
                warnings.simplefilter("ignore")
                index = DiffusionPipeline.load_config(model, local_files_only=True)
        else:
            return ""
    except (OSError, ValueError):
        return ""  # no readable index, or a hub id not in the cache
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""


def is_local_model(model: str | os.PathLike) -> bool:
    """True when `model` names a local folder or file (existing or not), False for an "org/name" hub id."""
    if isinstance(model, os.PathLike):
        return True
    text = str(model)
    return (
        _is(Path.exists, Path(text).expanduser())
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") != 1
        or Path(text).suffix.lower() in CHECKPOINT_SUFFIXES
    )


def load_pipeline(
    model: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    skip: tuple[str, ...] = (),
) -> DiffusionPipeline:
    """Load `model` on the CPU; anything missing or broken raises ModelLoadError with a one-line fix.

    `config` is a diffusers folder (or hub id) of the same family that gives a single-file checkpoint
    its component configs and tokenizer; `allow_pickle` opts in to .ckpt/.bin/.pt/.pth checkpoints.
    The name "shapes" (unless a local path of that name exists) is the built-in model shipped
    inside the package. `skip` names components of a folder or hub id not to load (None in the pipeline).
    """
    if _builtin(model):
        return _load_builtin(torch_dtype)
    if len(str(model)) > MAX_NAME or any(len(part) > 255 for part in str(model).split("/")):
        raise ModelLoadError(f"no such model folder or file, nor hub id: a name of {len(str(model)):,} characters "
                             "is longer than any path or hub id")
    skipped = dict.fromkeys(skip)
    if not is_local_model(model):
        return _load_hub_id(str(model), torch_dtype, skipped)
    path = Path(model).expanduser()
    if path.is_dir():
        folder = _pipeline_folder(path)
        return _guarded(str(path), lambda: DiffusionPipeline.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, **skipped))
    if path.is_file():
        return _load_single_file(path, torch_dtype, config, allow_pickle)
    raise ModelLoadError(f"no such model folder or file: '{model}'")


def check_model(model: str | os.PathLike, allow_pickle: bool = False) -> None:
    """What load_pipeline looks at before reading any weights, checked without loading: the folder, file or cached
    hub id is there. A server that offers models says at start-up, in one line, that one is missing, not when a
    user first picks it."""
    if _builtin(model):
        _check_builtin()
    elif not is_local_model(model):
        if not _pipeline_class_name(str(model)) and not _hub_reachable():
            raise _not_cached(str(model))
    elif Path(model).expanduser().is_dir():
        _pipeline_folder(Path(model).expanduser())
    elif Path(model).expanduser().is_file():
        _check_checkpoint(Path(model).expanduser(), allow_pickle)
    else:
        raise ModelLoadError(f"no such model folder or file: '{model}'")


def is_cascade(model: str | os.PathLike) -> bool:
    """Whether a model, by its files alone, is a cascade's first stage (DeepFloyd IF), which takes a super-resolution
    stage."""
    return not _builtin(model) and family_class(_pipeline_class_name(str(model))) in CASCADES


def _check_builtin() -> None:
    if not (BUILTIN_FOLDER / "model_index.json").is_file():
        raise ModelLoadError(
            f"the built-in '{BUILTIN_NAME}' model is not in this install ({BUILTIN_FOLDER}): "
            "train it with 'python -m imagic.shapes.train', or pass --model"
        )


def _load_builtin(torch_dtype) -> DiffusionPipeline:
    _check_builtin()
    pipe = _guarded(BUILTIN_NAME, lambda: DiffusionPipeline.from_pretrained(
        BUILTIN_FOLDER, dtype=torch_dtype or torch.float32, local_files_only=True))
    # Edit states then name the model "shapes", which loads on any install, not this one's path.
    pipe.register_to_config(_name_or_path=BUILTIN_NAME)
    return pipe


def _pipeline_folder(path: Path) -> Path:
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{path}' is not a diffusers pipeline folder (no model_index.json): "
            "pass a folder written by save_pretrained, or a .safetensors checkpoint"
        )
    return path


def _check_checkpoint(path: Path, allow_pickle: bool) -> None:
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"'{path}' is not a model: pass a diffusers folder or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})"
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"'{path}': pickled checkpoints can run code when loaded; convert to .safetensors or pass --allow-pickle"
        )


def _load_single_file(path: Path, torch_dtype, config, allow_pickle: bool) -> DiffusionPipeline:
    _check_checkpoint(path, allow_pickle)
    local_config = config is not None and is_local_model(config)
    if local_config:
        config_path = Path(config).expanduser()
        if not config_path.is_dir():
            raise ModelLoadError(f"no such config folder: '{config}'")
        config = str(_pipeline_folder(config_path))
    pipeline = _single_file_pipeline(path, Path(config) if local_config else None)
    if not hasattr(pipeline, "from_single_file"):
        raise ModelLoadError(f"'{path}' is a {pipeline.__name__} checkpoint, which diffusers loads from a model folder "
                             "only: pass the diffusers folder of the model")
    if not local_config and not _hub_reachable():
        # Without a local config diffusers fetches the family's configs from the hub, retrying for a long time.
        raise ModelLoadError(
            f"'{path}' needs the configs of its model family and the hub cannot be reached (no network): "
            "pass --config with a local diffusers folder of the same family (e.g. SD 1.5 for an SD 1.5 checkpoint)"
        )
    # diffusers reads pickled checkpoints with torch.load(weights_only=True): tensors only, no code runs.
    return _guarded(str(path), lambda: pipeline.from_single_file(
        str(path), config=config, dtype=torch_dtype, local_files_only=local_config))


def _single_file_pipeline(path: Path, config: Path | None) -> type[DiffusionPipeline]:
    """The pipeline a single-file checkpoint loads into: the one its config folder's model_index.json names (of
    the families that load single files), else the one its tensors show (SINGLE_FILE_MARKERS), else Stable
    Diffusion's."""
    if config is not None:
        name = _pipeline_class_name(str(config))
        if name in SINGLE_FILE_PIPELINES:
            return getattr(diffusers, name)
        if name:
            return StableDiffusionPipeline
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as checkpoint:
                keys = list(checkpoint.keys())
        except (OSError, SafetensorError):
            keys = []  # unreadable: diffusers' loader says what is wrong
        for marker, name in SINGLE_FILE_MARKERS:
            if any(marker in key for key in keys):
                return getattr(diffusers, name)
    return StableDiffusionPipeline


def _load_hub_id(repo_id: str, torch_dtype, skipped: dict) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype, local_files_only=True, **skipped)
    except _LOAD_ERRORS:
        pass  # not (fully) in the local cache
    if not _hub_reachable():
        raise _not_cached(repo_id)
    return _guarded(repo_id, lambda: DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype, **skipped))


def _not_cached(repo_id: str) -> ModelLoadError:
    return ModelLoadError(f"'{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached (no "
                          "network): download it on a machine with a network or pass a local folder")


def _guarded(what: str, load: Callable[[], DiffusionPipeline]) -> DiffusionPipeline:
    """Run a loading call; its failures become one-line ModelLoadErrors, our own bugs keep their tracebacks."""
    try:
        return load()
    except _LOAD_ERRORS as error:
        text = str(error)
        if isinstance(error, SingleFileComponentError):
            text = text.split("\n")[0]  # the rest is Python advice for library users
        detail = " ".join(text.split()) or type(error).__name__
        if isinstance(error, KeyError):
            detail = f"missing key {detail}"
        raise ModelLoadError(f"cannot load '{what}': {detail}") from error


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False in offline mode or when a TCP connect to the hub endpoint fails (no DNS fails at once)."""
    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    if not endpoint.hostname:
        return False
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
