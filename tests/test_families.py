"""The family contract: what a family implements, the registry, and defaults that follow the family."""

import inspect
import json
from dataclasses import replace

from imagic import families
from imagic.defaults import SHAPES, STABLE_DIFFUSION
from imagic.editor import ImagicEditor
from imagic.families import ModelFamily, StableDiffusionFamily, family_class
from imagic.loading import defaults_before_loading


def _members(protocol: type) -> set[str]:
    names = {name for name, _ in inspect.getmembers(protocol) if not name.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


def test_stable_diffusion_implements_every_member_of_the_contract(sd1_pipe):
    family = StableDiffusionFamily(sd1_pipe)
    missing = {name for name in _members(ModelFamily) if not hasattr(family, name)}
    assert not missing and _members(ModelFamily) >= {"encode_text", "encode_image", "predict", "sample", "defaults"}
    for name in ("encode_text", "encode_image", "predict", "invert", "sample"):
        assert list(inspect.signature(getattr(family, name)).parameters) == \
            list(inspect.signature(getattr(ModelFamily, name)).parameters)[1:]


class _OtherFamily(StableDiffusionFamily):
    """A family of its own with its own defaults, as SDXL will be."""

    name = "other"
    defaults = replace(STABLE_DIFFUSION, guidance_scale=5.0, num_inference_steps=30, etas=(0.5,))


def test_defaults_follow_the_family_not_the_model_name(sd1_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (("OtherPipeline", _OtherFamily), *families.FAMILIES))
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "OtherPipeline"}))
    assert family_class("OtherPipeline") is _OtherFamily
    assert defaults_before_loading(folder) is _OtherFamily.defaults
    editor = ImagicEditor(sd1_pipe)
    monkeypatch.setattr(editor, "family", _OtherFamily(sd1_pipe))
    assert editor.defaults is _OtherFamily.defaults


def test_defaults_before_loading_read_the_models_own_files(sd1_folder, tmp_path):
    assert defaults_before_loading(None) is SHAPES and defaults_before_loading("shapes") is SHAPES
    assert defaults_before_loading(sd1_folder) is STABLE_DIFFUSION
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "SomeFuturePipeline"}))
    assert defaults_before_loading(unknown) is STABLE_DIFFUSION  # loading it will say it is not supported
    assert defaults_before_loading(tmp_path / "missing.safetensors") is STABLE_DIFFUSION
