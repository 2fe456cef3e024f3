"""Where sampling starts: pure noise (the paper), the photo noised to a strength (as SDEdit), or its DDIM inversion."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagic.cli import main
from imagic.defaults import STABLE_DIFFUSION
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.loading import load_pipeline

from helpers import pixels, quick_settings, scene_image

SAMPLE = dict(num_inference_steps=8, progress=False)
EXAMPLE = Path(__file__).parent.parent / "examples" / "person.png"


@pytest.fixture(scope="module")
def full_edit(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("full"), progress=False)
    return editor, state


@pytest.fixture(scope="module")
def shapes_edit():
    """The built-in model: a trained VAE and denoiser, so distances to the photo mean something."""
    editor = ImagicEditor(load_pipeline("shapes"))
    state = editor.train(EXAMPLE, "a photo of a red person sitting", quick_settings("full"), progress=False)
    return editor, state


def _distance(image, other) -> float:
    return float(np.mean((pixels(image) - pixels(other)) ** 2))


def test_a_low_strength_start_keeps_more_of_the_photo_than_noise(shapes_edit):
    editor, state = shapes_edit
    photo = Image.open(EXAMPLE).convert("RGB")
    from_noise = editor.sample(state, [1.0], [0], strength=1.0, **SAMPLE).images[(1.0, 0)]
    from_photo = editor.sample(state, [1.0], [0], image=EXAMPLE, strength=0.3, **SAMPLE).images[(1.0, 0)]
    assert _distance(from_photo, photo) < 0.5 * _distance(from_noise, photo)


def test_strength_one_with_the_photo_is_the_papers_noise_start(full_edit):
    editor, state = full_edit
    with pytest.warns(UserWarning, match="carries no photo"):
        plain = editor.sample(replace(state, photo={}), [0.8], [2], **SAMPLE).images[(0.8, 2)]
    given = editor.sample(state, [0.8], [2], image=scene_image(), strength=1.0, **SAMPLE).images[(0.8, 2)]
    assert (pixels(plain) == pixels(given)).all()


def test_a_strength_left_out_is_the_one_the_edit_was_shown_with_else_the_models_default(full_edit, monkeypatch):
    editor, state = full_edit
    monkeypatch.setattr(type(editor), "defaults", property(lambda self: replace(STABLE_DIFFUSION, strength=0.6)))
    # A state saved before version 4 records neither its photo nor how it was shown: the model's defaults.
    old = replace(state, photo={}, sampling={})
    by_default = editor.sample(old, [0.8], [2], image=scene_image(), **SAMPLE).images[(0.8, 2)]
    given = editor.sample(old, [0.8], [2], image=scene_image(), strength=0.6, **SAMPLE).images[(0.8, 2)]
    with pytest.warns(UserWarning, match="carries no photo"):
        without_photo = editor.sample(old, [0.8], [2], **SAMPLE).images[(0.8, 2)]
    from_noise = editor.sample(old, [0.8], [2], image=scene_image(), strength=1.0, **SAMPLE).images[(0.8, 2)]
    assert (pixels(by_default) == pixels(given)).all() and (pixels(without_photo) == pixels(from_noise)).all()
    assert not (pixels(by_default) == pixels(from_noise)).all()
    # The state as trained records the start it was shown with (the defaults of then), photo and all.
    recorded = state.sampling["strength"]
    as_shown = editor.sample(state, [0.8], [2], **SAMPLE).images[(0.8, 2)]
    restated = editor.sample(state, [0.8], [2], image=scene_image(), strength=recorded, **SAMPLE).images[(0.8, 2)]
    assert (pixels(as_shown) == pixels(restated)).all()
    assert editor.check_sampling([1.0], [0], with_photo=True).strength == 0.6
    assert editor.check_sampling([1.0], [0], with_photo=True, invert=True).strength == 1.0


def test_an_inverted_start_is_deterministic_and_gives_the_photo_back(shapes_edit):
    editor, state = shapes_edit
    photo = Image.open(EXAMPLE).convert("RGB")
    settings = dict(guidance_scale=1.0, **SAMPLE)  # eta 0 without guidance: the inversion's own embedding
    inverted = editor.sample(state, [0.0], [0, 1], image=EXAMPLE, invert=True, **settings)
    from_noise = editor.sample(state, [0.0], [0], strength=1.0, **settings).images[(0.0, 0)]
    assert (pixels(inverted.images[(0.0, 0)]) == pixels(inverted.images[(0.0, 1)])).all()
    assert _distance(inverted.images[(0.0, 0)], photo) < 0.85 * _distance(from_noise, photo)


@pytest.mark.parametrize("options, message", [
    (dict(image=scene_image(seed=3, width=40), strength=0.5), "not the photo this edit was trained on"),
    (dict(strength=0.5, photo_left_out=True), "needs the photo"),
    (dict(invert=True, photo_left_out=True), "needs the photo"),
    (dict(image=scene_image(), strength=0.0), "above 0 and at most 1"),
    (dict(image=scene_image(), strength=float("nan")), "above 0 and at most 1"),
    (dict(image=scene_image(), strength=0.5, invert=True), "either invert or a strength"),
    (dict(image=scene_image(), strength=0.1), "no denoising step"),
])
def test_bad_starts_are_refused_before_sampling(full_edit, options, message):
    editor, state, options = *full_edit, dict(options)
    if options.pop("photo_left_out", False):  # a state that carries no photo (saved before version 4)
        state = replace(state, photo={})
    with pytest.raises(SettingsError, match=message):
        editor.sample(state, [1.0], [0], **SAMPLE, **options)


CLI_FAST = ["--method", "lora", "--embedding-steps", "2", "--finetune-steps", "2", "--steps", "4", "--quiet"]


def test_cli_samples_from_the_photo_and_sample_reproduces_it(sd1_folder, tmp_path):
    photo = tmp_path / "photo.png"
    scene_image().save(photo)
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a red dog", "--model", str(sd1_folder), "--out", str(out),
                 "--eta", "1", "--strength", "0.6", *CLI_FAST]) == 0
    again = tmp_path / "again"
    assert main(["sample", str(out / "state.safetensors"), "--model", str(sd1_folder), "--image", str(photo),
                 "--eta", "1", "--strength", "0.6", "--steps", "4", "--quiet", "--out", str(again)]) == 0
    assert (again / "eta1_seed0.png").read_bytes() == (out / "eta1_seed0.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["edit", "PHOTO", "a dog", "--strength", "0.5", "--invert"], "either --invert or a --strength"),
    (["edit", "PHOTO", "a dog", "--strength", "0.1", "--steps", "4"], "leaves no denoising step"),
])
def test_cli_refuses_a_bad_start_before_any_work(tmp_path, capsys, args, message):
    photo, state = tmp_path / "photo.png", tmp_path / "state.safetensors"
    scene_image().save(photo)
    state.write_bytes(b"not read: the start is checked first")
    args = [str(photo) if a == "PHOTO" else str(state) if a == "STATE" else a for a in args]
    assert main([*args, "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_strength_out_of_range_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "photo.png", "a dog", "--strength", "1.5"])
    assert "not a number above 0 and at most 1" in capsys.readouterr().err.strip().splitlines()[-1]
