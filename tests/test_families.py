"""The family contract: what a family implements, the registry, and defaults that follow the family."""

import inspect
import json
from dataclasses import replace

import pytest

from imagic import families
from imagic.defaults import DEFAULTS_FILE, STABLE_DIFFUSION, folder_defaults
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.families import Level, ModelFamily, StableDiffusionFamily, family_class, family_for
from imagic.loading import BUILTIN_FOLDER, defaults_before_loading


def _members(protocol: type) -> set[str]:
    names = {name for name, _ in inspect.getmembers(protocol) if not name.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize("pipes", [("sd1_pipe",), ("sd2_pipe",), ("sdxl_pipe",), ("if_pipe",), ("if_pipe", "if_ii_pipe"),
                                   ("sd3_pipe",), ("flux_pipe",), ("qwen_pipe",)])
def test_every_family_and_level_implements_every_member_of_the_contract(pipes, request):
    family = family_for(*(request.getfixturevalue(name) for name in pipes))
    assert not {name for name in _members(ModelFamily) if not hasattr(family, name)}
    assert len(family.levels) == len(pipes) and family.base is family.levels[0]
    for name in ("encode_text", "invert", "sample"):
        assert list(inspect.signature(getattr(family, name)).parameters) == \
            list(inspect.signature(getattr(ModelFamily, name)).parameters)[1:]
    for level in family.levels:
        assert not {name for name in _members(Level) if not hasattr(level, name)} and level.name.isidentifier()
        for name in ("encode_image", "conditions", "predict"):
            assert list(inspect.signature(getattr(level, name)).parameters) == \
                list(inspect.signature(getattr(Level, name)).parameters)[1:]


def test_a_super_resolution_stage_is_refused_where_it_does_not_fit(sd1_pipe, if_pipe, if_ii_pipe):
    with pytest.raises(SettingsError, match="no super-resolution stage"):
        family_for(sd1_pipe, if_ii_pipe)
    with pytest.raises(SettingsError, match="must be an IFSuperResolutionPipeline"):
        family_for(if_pipe, sd1_pipe)


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
    shapes = folder_defaults(BUILTIN_FOLDER)  # the built-in model carries its measured defaults
    assert shapes is not None and shapes != STABLE_DIFFUSION
    assert defaults_before_loading(None) == shapes == defaults_before_loading("shapes")
    assert defaults_before_loading(sd1_folder) is STABLE_DIFFUSION
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "SomeFuturePipeline"}))
    assert defaults_before_loading(unknown) is STABLE_DIFFUSION  # loading it will say it is not supported
    assert defaults_before_loading(tmp_path / "missing.safetensors") is STABLE_DIFFUSION


def test_a_model_folder_may_carry_defaults_of_its_own_which_win_over_its_familys(sd1_pipe, tmp_path):
    folder = tmp_path / "my-model"
    sd1_pipe.save_pretrained(folder)
    own = STABLE_DIFFUSION.but(etas=(0.9,), guidance_scale=3.0)
    (folder / DEFAULTS_FILE).write_text(json.dumps({**own.to_dict(), "why": "measured on my photos"}))
    assert defaults_before_loading(folder) == own
    assert ImagicEditor.from_pretrained(folder, device="cpu").defaults == own
    assert ImagicEditor(sd1_pipe).defaults is STABLE_DIFFUSION  # a pipeline built in memory: its family's
