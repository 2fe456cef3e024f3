"""The shapes world, its shipped classifier, and the built-in model that ships with the package."""

from pathlib import Path

import numpy as np
import pytest
import torch

import imagic.loading
from imagic import stages
from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import ModelLoadError
from imagic.families import Text
from imagic.loading import load_pipeline
from imagic.shapes.cases import EditCase
from imagic.shapes.classifier import classify, load_classifier
from imagic.shapes.model import CLASSIFIER_FILE, build_tokenizer
from imagic.shapes.scoring import score_outputs
from imagic.shapes.world import (
    ACCENTS,
    BUILDS,
    COLOURS,
    POSES,
    SHAPES,
    SIZE,
    VOCABULARY,
    edited,
    random_scene,
    render,
)
from imagic.state import EditState

EXAMPLE = Path(__file__).parent.parent / "examples" / "person.png"


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CLASSIFIER_FILE)


@pytest.fixture(scope="module")
def shapes_pipe():
    return load_pipeline("shapes")


def test_same_seed_gives_the_same_scene_and_pixels():
    a, b = random_scene(np.random.default_rng(7)), random_scene(np.random.default_rng(7))
    assert a == b
    assert np.array_equal(np.asarray(render(a)[0]), np.asarray(render(b)[0]))
    assert random_scene(np.random.default_rng(8)) != a


@pytest.mark.parametrize("subject, attribute, values", [
    ("person", "pose", POSES), ("shape", "shape", SHAPES), ("person", "colour", list(COLOURS)),
])
def test_ideal_edit_changes_the_subject_and_keeps_everything_else(subject, attribute, values):
    scene = random_scene(np.random.default_rng(3), subject)
    image, mask = render(scene)
    value = next(v for v in values if v not in (scene.form, scene.colour))
    target = edited(scene, attribute, value)
    target_image, target_mask = render(target)
    outside = ~(mask | target_mask)
    before, after = np.asarray(image, np.int16), np.asarray(target_image, np.int16)
    # Antialiased edges reach a pixel past the masks (which keep pixels at least half covered).
    grown = np.zeros_like(outside)
    grown[1:-1, 1:-1] = outside[:-2, 1:-1] & outside[2:, 1:-1] & outside[1:-1, :-2] & outside[1:-1, 2:] & outside[1:-1, 1:-1]
    assert np.array_equal(before[grown], after[grown])
    assert np.abs(before - after)[mask | target_mask].mean() > 20
    assert target.caption != scene.caption and value in target.caption


def test_identity_is_never_named_and_every_edit_keeps_it():
    identity_words = set(ACCENTS) | {build for builds in BUILDS.values() for build in builds}
    assert not identity_words & set(VOCABULARY)
    rng = np.random.default_rng(4)
    for _ in range(20):
        scene = random_scene(rng)
        assert not identity_words & set(scene.caption.split())
        attribute, values = ("pose", POSES) if scene.subject == "person" else ("shape", SHAPES)
        for target in [edited(scene, attribute, v) for v in values] + [edited(scene, "colour", c) for c in COLOURS]:
            assert (target.accent, target.build, target.x, target.y) == (scene.accent, scene.build, scene.x, scene.y)


def test_a_pose_edit_keeps_the_feet_on_the_same_ground_point():
    scene = random_scene(np.random.default_rng(9), "person")
    for pose in POSES:
        mask = render(edited(scene, "pose", pose))[1]
        if pose != "jumping":  # in the air
            ground = np.nonzero(mask[int(scene.y) - 1])[0]
            # lying, the whole body is on the ground and the feet are its right end
            feet = ground.max() - scene.thickness if pose == "lying" else ground.mean()
            assert abs(feet - scene.x) < 0.1 * scene.size, pose


def test_edit_that_does_not_fit_the_subject_is_refused():
    person = random_scene(np.random.default_rng(0), "person")
    with pytest.raises(ValueError, match="cannot set shape"):
        edited(person, "shape", "star")


def test_every_form_of_a_scene_stays_inside_the_frame():
    rng = np.random.default_rng(11)
    for _ in range(40):
        scene = random_scene(rng)
        for form in POSES if scene.subject == "person" else SHAPES:
            mask = render(edited(scene, "pose" if scene.subject == "person" else "shape", form))[1]
            assert mask.sum() > 30
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_caption_words_are_whole_tokens_and_unknown_words_still_tokenize(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    for word in VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    ids = tokenizer("a zebra").input_ids
    assert len(ids) > 4 and tokenizer.unk_token_id not in ids[1:-1]


def test_shipped_classifier_recognises_fresh_renders(classifier):
    rng = np.random.default_rng(2026)
    scenes = [random_scene(rng) for _ in range(120)]
    predicted = classify(classifier, [render(s)[0] for s in scenes])
    for attribute in ("form", "colour", "accent", "build"):
        assert np.mean([p[attribute] == getattr(s, attribute) for p, s in zip(predicted, scenes)]) >= 0.97, attribute


def test_builtin_model_loads_by_name_and_generates_what_its_caption_says(shapes_pipe, classifier):
    assert shapes_pipe.name_or_path == "shapes" and shapes_pipe.unet.dtype == torch.float32
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng) for _ in range(12)]
    shapes_pipe.set_progress_bar_config(disable=True)
    images = shapes_pipe([s.caption for s in scenes], num_inference_steps=20, guidance_scale=4.0,
                         generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))]).images
    assert images[0].size == (SIZE, SIZE)
    predicted = classify(classifier, images)
    matches = [p["form"] == s.form and p["colour"] == s.colour for p, s in zip(predicted, scenes)]
    assert sum(matches) >= 9, list(zip([s.caption for s in scenes], predicted))


def test_missing_builtin_model_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(imagic.loading, "BUILTIN_FOLDER", tmp_path)
    with pytest.raises(ModelLoadError, match="not in this install.*imagic.shapes.train"):
        load_pipeline("shapes")


def test_cli_edits_with_the_builtin_model_by_default_and_samples_it_again(tmp_path):
    out = tmp_path / "edit"
    assert main(["edit", str(EXAMPLE), "a photo of a red person sitting", "--out", str(out), "--quiet",
                 "--method", "lora", "--embedding-steps", "5", "--finetune-steps", "5", "--steps", "4",
                 "--eta", "0.7"]) == 0
    state = EditState.load(out / "state.safetensors")
    assert state.base_model["name"] == "shapes" and (state.height, state.width) == (SIZE, SIZE)
    # with the photo, sample starts where edit did: the model's default start from the photo
    assert main(["sample", str(out / "state.safetensors"), "--image", str(EXAMPLE), "--eta", "0.7", "--steps", "4",
                 "--quiet", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "eta0.7_seed0.png").read_bytes() == (out / "eta0.7_seed0.png").read_bytes()


def test_imagic_on_the_builtin_model_makes_the_person_sit_and_longer_fine_tuning_gives_the_photo_back(
        shapes_pipe, classifier):
    """The whole method with the built-in model's defaults, scored as the quality benchmark scores.

    The defaults fine-tune briefly and sample from the photo inside the automatic edit mask (the benchmark's
    best confirmed trade-off, which keeps the identity in about half the edits): from both seeds the person
    sits on a background kept by the mask, and at least one keeps the person's identity. The same run goes on to
    300 fine-tuning steps, where eta 0 from noise, unmasked, must give more of the background back, whatever
    the seed.
    """
    scene = random_scene(np.random.default_rng(114), "person")  # examples/person.png
    case = EditCase(0, "pose", scene, edited(scene, "pose", "sitting"))
    editor = ImagicEditor(shapes_pipe)
    settings = editor.defaults.train_settings()
    assert settings.fine_tune.steps < 300
    # One run, composed from the stage functions, sampled after the default steps and after 300.
    photo, e_tgt = editor.photo(EXAMPLE, settings), editor.family.encode_text(case.target_text)
    precision = editor.precision(settings)
    e_opt, first = stages.optimize_embedding(editor.family, photo, e_tgt, settings, precision)
    tuning = stages.FineTuning(editor.family, editor.family.base, photo, Text(e_opt), settings.with_fine_tune_steps(300),
                               precision)
    states = []
    for steps in (settings.fine_tune.steps, 300):
        tuning.run(steps)
        states.append(stages.checkpoint(editor.family, editor.identity, case.target_text, photo, e_tgt, settings, first,
                                        tuning))
    state, long_state = states
    embedding_losses = state.losses["embedding"]
    half = len(embedding_losses) // 2
    assert np.mean(embedding_losses[half:]) < np.mean(embedding_losses[:half])
    seeds = [0, 1]

    def scores(edit_state, etas, image=None, **options):
        output = editor.sample(edit_state, etas, seeds, image=image, progress=False, **options)
        return [score_outputs(case, [output.images[(eta, seed)] for seed in seeds], classifier) for eta in etas]

    (edits,) = scores(state, [editor.defaults.eta], EXAMPLE)  # with the photo: the default start, from it
    # from noise (the paper's start), eta 0 shows what the fine-tuning itself gives back
    (reconstructions,) = scores(state, [0.0], strength=1.0, mask="none")
    (long_reconstructions,) = scores(long_state, [0.0], strength=1.0, mask="none")
    assert all(score["named_success"] == 1.0 and score["background_psnr"] > 25 for score in edits), edits
    assert any(score["success"] == 1.0 for score in edits), edits
    assert all(score["read"]["form"] == "standing" for score in reconstructions), reconstructions
    # Eta 0 gives more of the background back the longer the fine-tuning, whatever the seed.
    for short, long in zip(reconstructions, long_reconstructions):
        assert long["background_psnr"] > short["background_psnr"] + 1.0, (short, long)
