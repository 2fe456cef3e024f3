"""Where sampling starts: pure noise (the paper), the photo noised to a strength (as SDEdit), or its DDIM inversion."""

import numpy as np
import pytest

from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.image_io import image_to_tensor

from helpers import pixels, quick_settings, scene_image

SAMPLE = dict(num_inference_steps=8, progress=False)


@pytest.fixture(scope="module")
def full_edit(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("full"), progress=False)
    return editor, state


def _distance(image, other) -> float:
    return float(np.mean((pixels(image) - pixels(other)) ** 2))


def _round_trip(editor: ImagicEditor, state):
    """The photo as the model's VAE gives it back: what a start from the photo can keep at best."""
    photo = scene_image().resize((state.width, state.height))
    latents = editor.family.encode_image(image_to_tensor(photo)) / editor.pipe.vae.config.scaling_factor
    return editor.pipe.image_processor.postprocess(editor.pipe.vae.decode(latents).sample.detach())[0]


def test_a_low_strength_start_keeps_more_of_the_photo_than_noise(full_edit):
    editor, state = full_edit
    photo = _round_trip(editor, state)
    from_noise = editor.sample(state, [1.0], [0], **SAMPLE).images[(1.0, 0)]
    from_photo = editor.sample(state, [1.0], [0], image=scene_image(), strength=0.3, **SAMPLE).images[(1.0, 0)]
    assert _distance(from_photo, photo) < 0.5 * _distance(from_noise, photo)


def test_strength_one_with_the_photo_is_the_papers_noise_start(full_edit):
    editor, state = full_edit
    plain = editor.sample(state, [0.8], [2], **SAMPLE).images[(0.8, 2)]
    given = editor.sample(state, [0.8], [2], image=scene_image(), strength=1.0, **SAMPLE).images[(0.8, 2)]
    assert (pixels(plain) == pixels(given)).all()


def test_an_inverted_start_is_deterministic_and_closer_to_the_photo(full_edit):
    editor, state = full_edit
    photo = _round_trip(editor, state)
    settings = dict(guidance_scale=1.0, **SAMPLE)
    inverted = editor.sample(state, [0.0], [0, 1], image=scene_image(), invert=True, **settings)
    from_noise = editor.sample(state, [0.0], [0], **settings).images[(0.0, 0)]
    assert (pixels(inverted.images[(0.0, 0)]) == pixels(inverted.images[(0.0, 1)])).all()
    assert _distance(inverted.images[(0.0, 0)], photo) < _distance(from_noise, photo)


@pytest.mark.parametrize("options, message", [
    (dict(image=scene_image(seed=3, width=40), strength=0.5), "not the photo this edit was trained on"),
    (dict(strength=0.5), "needs the photo"),
    (dict(invert=True), "needs the photo"),
    (dict(image=scene_image(), strength=0.0), "above 0 and at most 1"),
    (dict(image=scene_image(), strength=float("nan")), "above 0 and at most 1"),
    (dict(image=scene_image(), strength=0.5, invert=True), "either invert or a strength"),
])
def test_bad_starts_are_refused_before_sampling(full_edit, options, message):
    editor, state = full_edit
    with pytest.raises(SettingsError, match=message):
        editor.sample(state, [1.0], [0], **SAMPLE, **options)
