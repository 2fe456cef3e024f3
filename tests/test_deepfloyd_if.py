"""DeepFloyd IF, the Imagen row: stage I and stage II as two levels, on tiny pipelines built from configs."""

import json

import pytest
import torch
import torch.nn.functional as F

from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError, StateMismatchError
from imagic.families.deepfloyd_if import IF_DEFAULTS, NOISE_LEVEL, DeepFloydIFFamily
from imagic.image_io import image_to_tensor
from imagic.loading import defaults_before_loading
from imagic.settings import StageSettings, TrainSettings
from imagic.state import EditState

from helpers import quick_settings, scene_image, snapshot

FAST = ["--embedding-steps", "3", "--finetune-steps", "2", "--method", "lora", "--lora-rank", "2",
        "--steps", "2", "--quiet"]
SAMPLE = dict(num_inference_steps=2, progress=False)


def _settings(method: str = "lora", **overrides):
    return quick_settings(method, embedding=StageSettings(4, 5e-2), fine_tune=StageSettings(3, 1e-3), **overrides)


@pytest.fixture(scope="module")
def cascade_edit(if_pipe, if_ii_pipe):
    editor = ImagicEditor(if_pipe, if_ii_pipe)
    before = {"stage_1": snapshot(if_pipe.unet), "stage_2": snapshot(if_ii_pipe.unet)}
    state = editor.train(scene_image(24, 16), "a photo of a sitting dog", _settings(), progress=False)
    return editor, state, before


def test_both_stages_are_fine_tuned_and_the_loaded_models_are_untouched(cascade_edit, if_pipe, if_ii_pipe):
    editor, state, before = cascade_edit
    assert state.complete and state.levels == ["stage_1", "stage_2"]
    assert set(state.stages) == {"embedding", "fine_tune", "fine_tune.stage_2"}
    assert len(state.losses["fine_tune.stage_2"]) == 3 and set(state.weights) == {"stage_1", "stage_2"}
    assert (state.height, state.width) == (16, 16)  # stage I's size; the photo is fitted by cropping
    for name, unet in (("stage_1", if_pipe.unet), ("stage_2", if_ii_pipe.unet)):
        assert all(torch.equal(before[name][k], t) for k, t in unet.state_dict().items())


def test_a_cascade_edit_round_trips_and_comes_out_at_stage_two_size(cascade_edit, tmp_path):
    editor, state, _ = cascade_edit
    first = editor.sample(state, [0.5, 1.0], [0], **SAMPLE).images
    assert {image.size for image in first.values()} == {(64, 64)}
    again = EditState.load(state.save(tmp_path / "if.safetensors"))
    assert again.levels == state.levels and again.weights.keys() == state.weights.keys()
    assert all(torch.equal(again.weights[level][k], t) for level in state.weights for k, t in state.weights[level].items())
    reloaded = ImagicEditor(editor.pipe, editor.family.super_resolution)
    after = reloaded.sample(again, [0.5, 1.0], [0], **SAMPLE).images
    assert all(after[key].tobytes() == first[key].tobytes() for key in first)


def test_stage_two_is_conditioned_on_the_noised_upscaled_photo_and_its_loss_reads_the_noise_channels(if_pipe, if_ii_pipe):
    family = DeepFloydIFFamily(if_pipe, if_ii_pipe)
    upper = family.levels[1]
    photo = image_to_tensor(scene_image(16, 16))
    conditions = upper.conditions(photo, 2, torch.Generator().manual_seed(0))
    assert conditions["upscaled"].shape == (2, 3, 64, 64) and conditions["noise_level"].tolist() == [NOISE_LEVEL] * 2
    # What IFSuperResolutionPipeline does at inference: bilinear upscaling, then noise at the noise level.
    upscaled = F.interpolate(photo, (64, 64), mode="bilinear", align_corners=True)
    noise = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    expected = if_ii_pipe.image_noising_scheduler.add_noise(upscaled.expand(2, -1, -1, -1), noise,
                                                            torch.tensor([NOISE_LEVEL] * 2))
    torch.testing.assert_close(conditions["upscaled"], expected)
    seen = {}
    forward = if_ii_pipe.unet.forward

    def recording(sample, t, **kwargs):
        seen.update(sample=sample, **kwargs)
        return forward(sample, t, **kwargs)

    if_ii_pipe.unet.forward = recording
    try:
        x_t = torch.randn(2, 3, 64, 64)
        embedding = {"prompt_embeds": family.encode_text("a dog").embedding["prompt_embeds"].expand(2, -1, -1)}
        prediction = upper.predict(if_ii_pipe.unet, x_t, torch.tensor([5, 900]), embedding, conditions)
    finally:
        del if_ii_pipe.unet.forward
    assert torch.equal(seen["sample"][:, 3:], conditions["upscaled"]) and torch.equal(seen["sample"][:, :3], x_t)
    assert torch.equal(seen["class_labels"], conditions["noise_level"])
    assert if_ii_pipe.unet.config.out_channels == 6 and prediction.shape == x_t.shape  # the variance is left out


def test_stage_two_s_conditions_go_where_its_copy_trains_not_where_the_loaded_model_sits(if_pipe, if_ii_pipe):
    """Full fine-tuning (and a quantized base) moves the loaded stage II out of the accelerator while its copy trains
    there: the noised upscaled photo must follow the training (x0's device; "meta" stands in for a GPU here)."""
    from imagic.optimisation import Batch

    upper = DeepFloydIFFamily(if_pipe, if_ii_pipe).levels[1]
    photo = image_to_tensor(scene_image(16, 16))
    batch = Batch(upper, torch.empty(1, 3, 64, 64, device="meta"), {}, {}, photo)
    conditions = batch.conditions(2, torch.Generator().manual_seed(0))
    assert {value.device.type for value in conditions.values()} == {"meta"}
    assert next(if_ii_pipe.unet.parameters()).device.type == "cpu"


def test_stage_two_s_text_goes_where_its_photo_is_while_the_loaded_base_is_elsewhere(if_pipe, if_ii_pipe,
                                                                                     monkeypatch):
    """A quantized base moves the loaded denoisers out of the accelerator for all of training, so the family's
    device (its loaded base's) is the CPU meanwhile: stage II's text must go where its photo and copy are. Here the
    family's device is made "meta" (a stand-in for "elsewhere") once the photo is encoded."""
    from imagic import stages
    from imagic.precision import resolve_precision

    family, settings = DeepFloydIFFamily(if_pipe, if_ii_pipe), _settings()
    photo = stages.Photo.fitted(scene_image(24, 16), *family.native_resolution(), settings.resize)
    e_tgt = family.encode_text("a photo of a sitting dog")
    for level in family.levels:
        photo.at(level)
    precision = resolve_precision("fp32", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(DeepFloydIFFamily, "device", property(lambda self: torch.device("meta")))
    tuned = stages.fine_tune(family, photo, e_tgt.embedding, e_tgt, settings, precision)
    assert tuned.finished and set(tuned.records) == {"fine_tune", "fine_tune.stage_2"}


@pytest.mark.parametrize("condition", ["e_tgt", "e_opt"])
def test_stage_two_is_fine_tuned_with_e_tgt_as_the_paper_does_or_e_opt_when_asked(if_pipe, if_ii_pipe, condition,
                                                                                   monkeypatch):
    editor = ImagicEditor(if_pipe, if_ii_pipe)
    upper = editor.family.levels[1]
    seen = []
    predict = upper.predict
    monkeypatch.setattr(upper, "predict", lambda d, x, t, e, c=None: seen.append(e["prompt_embeds"][:1].clone())
                        or predict(d, x, t, e, c))
    state = editor.train(scene_image(16, 16), "a photo of a red dog", _settings(upper_condition=condition),
                         progress=False)
    expected = getattr(state, condition)["prompt_embeds"]
    assert len(seen) == 3 and all(torch.equal(e, expected) for e in seen)
    assert not torch.equal(state.e_tgt["prompt_embeds"], state.e_opt["prompt_embeds"])


def test_stage_two_takes_its_own_steps_and_zero_leaves_it_as_loaded(if_pipe, if_ii_pipe, tmp_path):
    editor = ImagicEditor(if_pipe, if_ii_pipe)
    state = editor.train(scene_image(16, 16), "a dog", _settings("full", upper_fine_tune={"stage_2": StageSettings(
        0, 1e-3)}), progress=False)
    assert state.complete and set(state.weights) == {"stage_1"} and "fine_tune.stage_2" not in state.stages
    first = editor.sample(state, [0.7], [1], **SAMPLE).images[(0.7, 1)]
    again = EditState.load(state.save(tmp_path / "s.safetensors"))
    assert ImagicEditor(if_pipe, if_ii_pipe).sample(again, [0.7], [1], **SAMPLE).images[(0.7, 1)].tobytes() == \
        first.tobytes()


def test_a_fine_tuned_level_samples_with_a_fixed_variance(if_pipe):
    trained = DeepFloydIFFamily._scheduler(if_pipe, None, trained=True)
    loaded = DeepFloydIFFamily._scheduler(if_pipe, None, trained=False)
    assert trained.config.variance_type == "fixed_small" and loaded.config.variance_type == "learned_range"
    assert trained.config.thresholding  # as the pipeline thresholds


def test_states_with_other_levels_or_of_another_family_are_refused(cascade_edit, if_pipe, sd1_pipe):
    _, state, _ = cascade_edit
    with pytest.raises(StateMismatchError, match="levels stage_1, stage_2, this model has stage_1"):
        ImagicEditor(if_pipe).sample(state, [0.5], [0], **SAMPLE)
    with pytest.raises(StateMismatchError, match="levels stage_1, stage_2, this model has unet"):
        ImagicEditor(sd1_pipe).sample(state, [0.5], [0], **SAMPLE)


def test_stage_one_alone_edits_at_64_px_scale_and_refuses_an_inverted_start(if_pipe):
    editor = ImagicEditor(if_pipe)
    assert editor.defaults is IF_DEFAULTS
    state = editor.train(scene_image(16, 16), "a dog", _settings(), progress=False)
    assert state.levels == ["stage_1"]
    images = editor.sample(state, [0.5], [0], image=scene_image(16, 16), strength=0.5, **SAMPLE).images
    assert images[(0.5, 0)].size == (16, 16)  # the photo start: IFImg2ImgPipeline
    with pytest.raises(SettingsError, match="cannot start from an inversion"):
        editor.sample(state, [0.5], [0], image=scene_image(16, 16), invert=True, **SAMPLE)


def test_the_cli_edits_and_resamples_with_both_stages(if_folders, tmp_path):
    stage_1, stage_2 = if_folders
    assert defaults_before_loading(stage_1) is IF_DEFAULTS
    photo = tmp_path / "photo.png"
    scene_image(32, 32).save(photo)
    out = tmp_path / "edit"
    model = ["--model", str(stage_1), "--super-resolution", str(stage_2)]
    assert main(["edit", str(photo), "a photo of a sitting dog", *model, "--out", str(out), "--eta", "0.7",
                 "--super-resolution-steps", "1", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == {"embedding": "done", "fine_tune": "done", "fine_tune.stage_2": "done"}
    assert len(summary["losses"]["fine_tune.stage_2"]["per_step"]) == 1
    again = tmp_path / "again"
    assert main(["sample", str(out / "state.safetensors"), *model, "--eta", "0.7", "--steps", "2", "--quiet",
                 "--out", str(again)]) == 0
    assert (again / "eta0.7_seed0.png").read_bytes() == (out / "eta0.7_seed0.png").read_bytes()


def test_the_cli_refuses_stage_two_steps_without_stage_two(if_folders, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    scene_image(16, 16).save(photo)
    code = main(["edit", str(photo), "a dog", "--model", str(if_folders[0]), "--out", str(tmp_path / "o"),
                 "--super-resolution-steps", "1", *FAST])
    assert code != 0 and "needs a super-resolution stage" in capsys.readouterr().err


def test_imagic_batch_edits_with_if(bench_folder, if_folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--model", str(if_folders[0]), "--super-resolution", str(if_folders[1]),
                 "--out", str(out), *FAST]) == 0
    assert "2 edited, 0 already" in capsys.readouterr().out


def test_per_level_settings_are_checked_and_round_trip():
    settings = _settings(upper_fine_tune={"stage_2": StageSettings(7, 1e-5)}, upper_condition="e_opt")
    assert TrainSettings.from_dict(settings.to_dict()) == settings
    assert settings.fine_tune_of("stage_2", base=False).steps == 7 and settings.fine_tune_of("stage_9", False).steps == 3
    for bad, words in (({"upper_fine_tune": {"stage.2": StageSettings(1, 1e-5)}}, "not a level name"),
                       ({"upper_fine_tune": {"stage_2": StageSettings(-1, 1e-5)}}, "stage_2 fine-tuning steps"),
                       ({"upper_condition": "e_mix"}, "upper levels' condition")):
        with pytest.raises(SettingsError, match=words):
            _settings(**bad)
