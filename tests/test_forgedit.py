"""Options beyond the paper, from Forgedit (Zhang et al., 2023): several noised copies per step, a stage 2
that stops on a reconstruction check, joint optimisation, vector projection and forgetting."""

import json

import pytest
import torch

from imagic import denoisers
from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.families import Text
from imagic.image_io import image_to_tensor
from imagic.optimisation import Batch, reconstruction_loss
from imagic.settings import StageSettings, TrainSettings
from imagic.stages import FineTuning, project
from imagic.state import EditState

from helpers import optimise, quick_settings, scene_image

SAMPLE = dict(num_inference_steps=3, progress=False)


def _encoded(pipe):
    family = ImagicEditor(pipe).family
    image = image_to_tensor(scene_image().resize(family.native_resolution()[::-1]))
    return family.base, family.base.encode_image(image), family.encode_text("a photo of a red dog").embedding


def test_each_step_trains_on_the_asked_number_of_noised_copies(sd1_pipe, monkeypatch):
    level, x0, e_tgt = _encoded(sd1_pipe)
    seen = []
    predict = level.predict
    monkeypatch.setattr(level, "predict", lambda d, x_t, t, e, c=None: seen.append((x_t, t)) or predict(d, x_t, t, e, c))
    model = denoisers.full_copy(level.denoiser).train()
    optimise(level, model, x0, e_tgt, StageSettings(steps=2, learning_rate=1e-4, copies=3))
    # The memory check first probes one copy's forward pass (budget.check_step_fits), then the two steps train.
    assert [x_t.shape[0] for x_t, _ in seen] == [1, 3, 3]
    assert len(set(seen[1][1].tolist())) > 1  # each copy has its own timestep (and noise)


def test_fine_tuning_stops_once_the_reconstruction_check_is_met(sd1_pipe):
    level, x0, e_tgt = _encoded(sd1_pipe)
    model = denoisers.full_copy(level.denoiser).train()
    settings = StageSettings(steps=300, learning_rate=5e-4, stop_ratio=0.8, check_every=5)
    result = optimise(level, model, x0, e_tgt, settings)
    assert result.finished and len(result.losses) < 300 and len(result.losses) % 5 == 0
    assert result.checks[-1] <= 0.8 * result.checks[0] < min(result.checks[:-1])
    assert reconstruction_loss(Batch(level, x0, e_tgt), model) == pytest.approx(result.checks[-1], rel=1e-5)


def test_joint_training_moves_the_embedding_with_the_weights(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    settings = quick_settings("lora", embedding=StageSettings(steps=0, learning_rate=5e-2), joint=True)
    state = editor.train(scene_image(), "a photo of a red dog", settings, progress=False)
    assert state.complete and not torch.equal(state.e_opt["prompt_embeds"], state.e_tgt["prompt_embeds"])
    photo, e_tgt = editor.photo(scene_image(), settings), editor.family.encode_text("a photo of a red dog")
    tuning = FineTuning(editor.family, editor.family.base, photo, e_tgt, settings, editor.precision(settings),
                        joint=True)
    tuning.run(5)
    early = tuning.e_opt()
    assert not torch.equal(early["prompt_embeds"], state.e_tgt["prompt_embeds"])
    assert not torch.equal(early["prompt_embeds"], state.e_opt["prompt_embeds"])
    tuning.run()
    assert torch.equal(tuning.e_opt()["prompt_embeds"], state.e_opt["prompt_embeds"])  # as the whole training
    frozen = editor.train(scene_image(), "a photo of a red dog", quick_settings(
        "lora", embedding=StageSettings(steps=0, learning_rate=5e-2)), progress=False)
    assert torch.equal(frozen.e_opt["prompt_embeds"], frozen.e_tgt["prompt_embeds"])
    assert isinstance(e_tgt, Text)


def test_projection_adds_the_part_of_the_text_orthogonal_to_e_opt():
    e_opt = {"prompt_embeds": torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])}
    e_tgt = {"prompt_embeds": torch.tensor([[[3.0, 4.0], [0.0, 5.0]]])}
    assert torch.equal(project(e_tgt, e_opt, 0.0)["prompt_embeds"], e_opt["prompt_embeds"])
    # Token 0: (3, 4) is 3 along (1, 0) and (0, 4) across it; token 1 is parallel to e_opt, so nothing is added.
    torch.testing.assert_close(project(e_tgt, e_opt, 1.0)["prompt_embeds"], torch.tensor([[[1.0, 4.0], [0.0, 2.0]]]))
    torch.testing.assert_close(project(e_tgt, e_opt, 0.5)["prompt_embeds"], torch.tensor([[[1.0, 2.0], [0.0, 2.0]]]))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_forgetting_sets_the_named_layers_back_to_the_base_model(sd1_pipe, method):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings(method), progress=False)
    base = sd1_pipe.unet
    rank = state.settings.lora_rank

    def rebuilt(forget):
        return denoisers.edited_denoiser(base, state.method, state.weights["unet"], rank, float(rank),
                                         editor.family.base.forget_groups.get(forget),
                                         targets=editor.family.base.lora_targets)

    def changed(model) -> set[str]:  # the weights that differ from the base model's (LoRA: B matrices not zero)
        weights = base.state_dict()
        if method == "lora":
            return {name for name, tensor in model.state_dict().items() if "lora_B" in name and tensor.abs().sum() > 0}
        return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, weights[name])}

    def blocks(names: set[str]) -> set[str]:
        return {name.split(".")[0] for name in names}

    encoder = {"conv_in", "time_embedding", "down_blocks", "mid_block"}
    assert {"down_blocks", "up_blocks"} <= blocks(changed(rebuilt("none")))
    assert not blocks(changed(rebuilt("encoder"))) & encoder and "up_blocks" in blocks(changed(rebuilt("encoder")))
    assert blocks(changed(rebuilt("decoder"))) <= encoder and "down_blocks" in blocks(changed(rebuilt("decoder")))
    kept = changed(rebuilt("all-but-encoder-kv"))
    assert kept and all(name.startswith("down_blocks.") and (".attn2.to_k." in name or ".attn2.to_v." in name)
                        for name in kept)


FAMILY_PIPES = ["sd1_pipe", "sdxl_pipe", "if_pipe", "sd3_pipe", "flux_pipe", "qwen_pipe"]


@pytest.mark.parametrize("pipe_name", FAMILY_PIPES)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_each_forgetting_group_resets_some_but_not_all_trained_tensors(request, pipe_name, method):
    """Every family names its own groups by its own layer names: no group may reset every trained tensor (the
    edit would silently become the base model) or none (the option would do nothing)."""
    level = ImagicEditor(request.getfixturevalue(pipe_name)).family.base
    view = denoisers.frozen_view(level.denoiser)
    if method == "lora":
        view = denoisers.add_lora(view, 2, 2.0, seed=0, targets=level.lora_targets)
    names = list(denoisers.trained_weights(view, method))
    assert level.forget_groups
    for group, forgotten in level.forget_groups.items():
        reset = [name for name in names if forgotten(name)]
        assert 0 < len(reset) < len(names), (group, len(reset), len(names))


@pytest.mark.parametrize("pipe_name, group", [("sd3_pipe", "encoder"), ("flux_pipe", "decoder"),
                                               ("sd1_pipe", "all-but-text-kv")])
def test_a_forgetting_group_the_family_lacks_is_refused_in_one_line(request, pipe_name, group):
    editor = ImagicEditor(request.getfixturevalue(pipe_name))
    with pytest.raises(SettingsError, match=f"has no forgetting group '{group}': its groups are none, ") as error:
        editor.check_sampling([1.0], [0], num_inference_steps=3, forget=group)
    assert "\n" not in str(error.value)


def test_forgetting_and_projection_change_the_images_and_are_recorded(sd1_folder, tmp_path):
    photo = tmp_path / "photo.png"
    scene_image(48, 40).save(photo)
    fast = ["--embedding-steps", "4", "--finetune-steps", "4", "--method", "lora", "--lora-rank", "2", "--steps", "3",
            "--quiet", "--model", str(sd1_folder), "--eta", "1"]
    assert main(["edit", str(photo), "a photo of a sitting dog", "--out", str(tmp_path / "a"), *fast]) == 0
    state = tmp_path / "a" / "state.safetensors"
    for option in (["--forget", "decoder"], ["--mix", "project"]):
        out = tmp_path / option[1]
        assert main(["sample", str(state), "--eta", "1", "--steps", "3", "--quiet", "--out", str(out), *option]) == 0
        assert (out / "eta1_seed0.png").read_bytes() != (tmp_path / "a" / "eta1_seed0.png").read_bytes()
        assert json.loads((out / "summary.json").read_text())["sampling"][option[0][2:]] == option[1]


def test_joint_copies_and_early_stop_reach_the_state_from_the_command_line(sd1_folder, tmp_path):
    photo = tmp_path / "photo.png"
    scene_image(48, 40).save(photo)
    state_path = tmp_path / "edit.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(state_path), "--quiet",
                 "--embedding-steps", "0", "--finetune-steps", "40", "--method", "lora", "--lora-rank", "2",
                 "--joint", "--copies", "2", "--finetune-stop", "0.99"]) == 0
    state = EditState.load(state_path)
    assert state.settings.joint and state.settings.fine_tune.copies == 2
    assert len(state.losses["fine_tune"]) < 40  # the check ended it
    assert not torch.equal(state.e_opt["prompt_embeds"], state.e_tgt["prompt_embeds"])


@pytest.mark.parametrize("settings, message", [
    (dict(fine_tune=StageSettings(10, 1e-4, copies=0)), "copies"),
    (dict(fine_tune=StageSettings(10, 1e-4, stop_ratio=1.5)), "stop ratio must be below 1"),
    (dict(fine_tune=StageSettings(10, 1e-4, stop_ratio=float("nan"))), "stop ratio"),
    (dict(joint="yes"), "joint must be true or false"),
])
def test_bad_forgedit_settings_are_refused(settings, message):
    with pytest.raises(SettingsError, match=message):
        TrainSettings(**settings)


def test_unknown_mix_or_forget_is_refused_before_sampling(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    for option, message in (({"mix": "average"}, "mix must be one of"), ({"forget": "middle"}, "no forgetting group")):
        with pytest.raises(SettingsError, match=message):
            editor.check_sampling([1.0], [0], guidance_scale=4.0, guidance_rescale=0.0, num_inference_steps=3,
                                  scheduler=None, batch_size=1, **option)
