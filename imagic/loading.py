"""Loading a model: a local diffusers folder, a hub id, or a single-file checkpoint.

Nothing here waits on a network that is not there: a hub id is looked up in the local cache
first, and when it is missing and the hub is unreachable the error comes at once.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import constants

from .errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# What a broken or missing checkpoint raises from inside diffusers/transformers/safetensors.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError)


def load_pipeline(
    model: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> DiffusionPipeline:
    """Load `model` on the CPU; raise ModelLoadError with a one-line fix for anything missing."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"'{path}' is not a diffusers pipeline folder (no model_index.json)")
        return _guarded(lambda: DiffusionPipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True), text)
    if path.is_file():
        return _load_single_file(path, torch_dtype, config, allow_pickle)
    if _looks_like_path(text):
        raise ModelLoadError(f"no such model folder or file: '{text}'")
    return _load_hub_id(text, torch_dtype)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) \
        or text.endswith(SINGLE_FILE_SUFFIXES) or text.count("/") != 1


def _guarded(load, what: str) -> DiffusionPipeline:
    try:
        return load()
    except _LOAD_ERRORS as error:
        message = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"cannot load '{what}': {message}") from None


def _load_single_file(path: Path, torch_dtype, config, allow_pickle: bool) -> DiffusionPipeline:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"'{path}' is not a checkpoint: expected a folder or one of {', '.join(SINGLE_FILE_SUFFIXES)}")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"'{path}' is a pickled checkpoint, which can run code when loaded: convert it to .safetensors "
            "or pass --allow-pickle (it is then loaded with weights_only=True)"
        )
    if config is None:
        raise ModelLoadError(
            f"a single-file checkpoint needs its configs: pass --config with a diffusers folder of the same family "
            f"(e.g. a Stable Diffusion 1.5 folder for an SD 1.5 checkpoint)"
        )
    local_config = Path(config).expanduser().is_dir()
    if not local_config and not _hub_reachable():
        raise ModelLoadError(f"config '{config}' is not a local folder and the hub cannot be reached (no network)")
    # diffusers reads pickled files with torch.load(weights_only=True): tensors only, no code.
    return _guarded(
        lambda: StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), dtype=torch_dtype, local_files_only=local_config
        ),
        str(path),
    )


def _load_hub_id(repo_id: str, torch_dtype) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype, local_files_only=True)
    except _LOAD_ERRORS:
        pass  # not in the local cache
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached (no network): "
            "download it on a machine with a network, or pass a local folder"
        )
    return _guarded(lambda: DiffusionPipeline.from_pretrained(repo_id, dtype=torch_dtype), repo_id)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: fails at once without DNS, within `timeout` otherwise."""
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
