"""The edit mask (beyond the paper): found where the predictions under e_tgt and e_opt differ, or drawn by the user;
the photo kept outside it by blending at every step, on every family."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from imagic import masks
from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.families.schedules import blended

from helpers import quick_settings, scene_image

SAMPLE = dict(num_inference_steps=3, progress=False)


class _Level:
    """A level whose prediction is what `predicted` makes of the embedding, at every noising."""

    def __init__(self, predicted):
        self.noise_scheduler = DDIMScheduler()
        self.predicted = predicted

    def predict(self, denoiser, x_t, t, embedding, conditions=None):
        return self.predicted(embedding["prompt_embeds"], x_t)


def _difference(predicted) -> torch.Tensor:
    e_tgt, e_opt = {"prompt_embeds": torch.ones(1, 3, 4)}, {"prompt_embeds": torch.zeros(1, 3, 4)}
    return masks.prediction_difference(_Level(predicted), torch.nn.Linear(1, 1), torch.zeros(1, 4, 8, 8), e_tgt, e_opt)


def test_the_mask_is_all_ones_where_the_predictions_differ_everywhere_and_zero_where_they_agree():
    everywhere = _difference(lambda text, x_t: text.mean() * torch.ones_like(x_t))
    assert torch.equal(masks.threshold(everywhere), torch.ones(1, 1, 8, 8))
    nowhere = _difference(lambda text, x_t: x_t * 2)
    assert torch.equal(masks.threshold(nowhere), torch.zeros(1, 1, 8, 8))

    def left_half(text, x_t):
        changed = torch.zeros_like(x_t)
        changed[..., :4] = text.mean()
        return x_t + changed

    region = masks.threshold(_difference(left_half), grow=0)
    assert region[..., :4].all() and not region[..., 4:].any()
    grown = masks.threshold(_difference(left_half), grow=1)
    assert grown[..., :5].all() and not grown[..., 5:].any()  # one latent pixel more on every side


def test_blending_with_an_all_zero_mask_gives_the_photos_latents_after_the_last_step():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    x0, latents, noise = torch.full((1, 4, 8, 8), 0.5), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    zero, one = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    assert torch.equal(blended(scheduler, scheduler.timesteps[-1], latents, x0, noise, zero), x0.expand(2, -1, -1, -1))
    assert torch.equal(blended(scheduler, scheduler.timesteps[-1], latents, x0, noise, one), latents)
    earlier = blended(scheduler, scheduler.timesteps[0], latents, x0, noise, zero)  # noised to the next timestep
    torch.testing.assert_close(earlier, scheduler.add_noise(x0, noise, scheduler.timesteps[1:2]))


@pytest.mark.parametrize("pipes", [("sd1_pipe",), ("sdxl_pipe",), ("sd3_pipe",), ("flux_pipe",), ("qwen_pipe",),
                                   ("if_pipe",), ("if_pipe", "if_ii_pipe")])
def test_every_family_keeps_the_photo_outside_the_mask(pipes, request, tmp_path):
    """Masked nowhere, every eta gives the same image, the photo itself (through the autoencoder); masked everywhere,
    the images are those sampled without a mask."""
    editor = ImagicEditor(*(request.getfixturevalue(name) for name in pipes))
    settings = quick_settings("lora", resolution=editor.family.resolution_multiple() * 4)
    photo = scene_image(40, 40)
    state = editor.train(photo, "a photo of a red dog", settings, progress=False)
    black, white = tmp_path / "black.png", tmp_path / "white.png"
    Image.new("L", (state.width, state.height), 0).save(black)
    Image.new("L", (state.width, state.height), 255).save(white)
    kept = editor.sample(state, [0.0, 1.0], [0], image=photo, mask=str(black), strength=1.0, **SAMPLE)
    assert kept.images[(0.0, 0)].tobytes() == kept.images[(1.0, 0)].tobytes()
    assert np.asarray(kept.mask).max() == 0 and kept.mask.size == kept.images[(0.0, 0)].size
    plain = editor.sample(state, [1.0], [0], image=photo, strength=1.0, **SAMPLE).images[(1.0, 0)]
    everywhere = editor.sample(state, [1.0], [0], image=photo, mask=str(white), strength=1.0, **SAMPLE).images[(1.0, 0)]
    assert everywhere.tobytes() == plain.tobytes()
    auto = editor.sample(state, [1.0], [0], image=photo, mask="auto", **SAMPLE)
    assert set(np.unique(np.asarray(auto.mask))) <= {0, 255}


def test_with_the_mask_the_background_is_the_photo_through_the_autoencoder(sd1_pipe, tmp_path):
    editor = ImagicEditor(sd1_pipe)
    photo = scene_image(32, 32)
    state = editor.train(photo, "a photo of a red dog", quick_settings("lora"), progress=False)
    black = tmp_path / "black.png"
    Image.new("L", (32, 32), 0).save(black)
    kept = editor.sample(state, [1.0], [3], image=photo, mask=str(black), strength=1.0, **SAMPLE).images[(1.0, 3)]
    x0 = editor.family.base.encode_image(torch.from_numpy(np.asarray(photo, np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    with torch.no_grad():
        decoded = sd1_pipe.vae.decode(x0 / sd1_pipe.vae.config.scaling_factor).sample
    [round_trip] = sd1_pipe.image_processor.postprocess(decoded)
    assert np.abs(np.asarray(kept, np.int16) - np.asarray(round_trip, np.int16)).max() <= 1


def test_a_model_that_masks_by_default_masks_where_the_photo_is_at_hand_and_none_turns_it_off(sd1_pipe, monkeypatch):
    editor = ImagicEditor(sd1_pipe)
    masking = replace(editor.defaults, mask="auto", mask_threshold=0.3, mask_grow=0)
    monkeypatch.setattr(type(editor), "defaults", property(lambda self: masking))
    photo = scene_image(32, 32)
    state = editor.train(photo, "a photo of a red dog", quick_settings("lora"), progress=False)
    assert (state.sampling["mask"], state.sampling["mask_threshold"], state.sampling["mask_grow"]) == ("auto", 0.3, 0)
    assert editor.sample(state, [1.0], [0], **SAMPLE).mask is not None  # the photo it carries
    assert editor.sample(state, [1.0], [0], mask="none", **SAMPLE).mask is None
    assert editor.check_sampling([1.0], [0]).mask == "none"  # no photo: nothing to keep
    # A state recorded before models had a default mask (mask None) was shown without one.
    old = replace(state, sampling={**state.sampling, "mask": None})
    assert editor.sample(old, [1.0], [0], **SAMPLE).mask is None


@pytest.mark.parametrize("picture, message", [
    (lambda path: Image.new("L", (64, 16)).save(path), "not of the edit's shape"),
    (lambda path: path.write_text("not a picture"), "mask is not a readable image"),
])
def test_a_mask_picture_of_the_wrong_shape_or_not_a_picture_is_one_line(sd1_pipe, tmp_path, picture, message):
    editor = ImagicEditor(sd1_pipe)
    photo = scene_image(32, 32)
    state = editor.train(photo, "a photo of a red dog", quick_settings("lora"), progress=False)
    path = tmp_path / "mask.png"
    picture(path)
    with pytest.raises(SettingsError, match=message) as error:
        editor.sample(state, [1.0], [0], image=photo, mask=str(path), **SAMPLE)
    assert "\n" not in str(error.value)


def test_the_command_line_writes_the_mask_and_refuses_a_picture_of_another_shape(sd1_folder, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    scene_image(32, 32).save(photo)
    fast = ["--embedding-steps", "3", "--finetune-steps", "3", "--method", "lora", "--lora-rank", "2", "--steps", "3",
            "--quiet", "--model", str(sd1_folder), "--eta", "1"]
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a red dog", "--out", str(out), "--mask", "auto", *fast]) == 0
    assert Image.open(out / "mask.png").size == (32, 32)
    # the state carries its photo: sampling it with a mask needs no --image
    assert main(["sample", str(out / "state.safetensors"), "--mask", "auto", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert (tmp_path / "s" / "mask.png").read_bytes() == (out / "mask.png").read_bytes()
    wrong = tmp_path / "wide.png"
    Image.new("L", (64, 16), 255).save(wrong)
    assert main(["edit", str(photo), "a photo of a red dog", "--out", str(tmp_path / "w"), "--mask", str(wrong),
                 *fast]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not of the edit's shape" in err[0] and not (tmp_path / "w" / "state.safetensors").exists()


def test_batch_writes_each_edits_mask_beside_its_output_and_takes_auto_only(sd1_folder, bench_folder, tmp_path, capsys):
    fast = ["--embedding-steps", "2", "--finetune-steps", "2", "--method", "lora", "--lora-rank", "2", "--steps", "3",
            "--quiet", "--model", str(sd1_folder)]
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--out", str(out), "--mask", "auto", *fast]) == 0
    assert Image.open(out / "masks" / "dog.png-a_photo_of_a_sitting_dog.png").size == (32, 32)
    picture = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(picture)
    assert main(["batch", str(bench_folder), "--out", str(tmp_path / "other"), "--mask", str(picture), *fast]) == 1
    assert "batch takes --mask auto" in capsys.readouterr().err


def test_a_state_edited_with_a_relative_mask_path_samples_from_another_folder(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene_image(32, 32).save("photo.png")
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save("left.png")
    assert main(["edit", "photo.png", "a photo of a red dog", "--out", "O", "--mask", "left.png", "--embedding-steps",
                 "2", "--finetune-steps", "2", "--method", "lora", "--lora-rank", "2", "--steps", "3", "--quiet",
                 "--model", str(sd1_folder), "--eta", "1"]) == 0
    monkeypatch.chdir(tmp_path / "O")  # the state records the picture by its full path, not by the path given
    assert main(["sample", "state.safetensors", "--out", str(tmp_path / "again"), "--eta", "1", "--quiet"]) == 0
    assert (tmp_path / "again" / "eta1_seed0.png").read_bytes() == (tmp_path / "O" / "eta1_seed0.png").read_bytes()
