"""Stable Diffusion XL on a tiny pipeline: both text tensors optimised and interpolated, the size/crop ids from
the photo, SDXL's zeroed negative prompt, its own defaults, and edits through the API and the command line."""

import json

import pytest
import torch

from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import StateMismatchError
from imagic.families.sdxl import SDXL_DEFAULTS, StableDiffusionXLFamily
from imagic.loading import defaults_before_loading
from imagic.state import EditState

from helpers import quick_settings, scene_image, snapshot

FAST = ["--embedding-steps", "4", "--finetune-steps", "4", "--method", "lora", "--lora-rank", "2", "--steps", "3",
        "--quiet"]


@pytest.fixture(scope="module")
def edit(sdxl_pipe):
    editor = ImagicEditor(sdxl_pipe)
    return editor, editor.train(scene_image(), "a photo of a red dog", quick_settings("lora"), progress=False)


def test_both_text_tensors_are_optimised_and_interpolated(edit):
    editor, state = edit
    assert isinstance(editor.family, StableDiffusionXLFamily)
    assert set(state.e_opt) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert state.e_opt["prompt_embeds"].shape[-1] == 64  # both encoders' tokens, side by side
    for name in state.e_opt:
        assert not torch.equal(state.e_opt[name], state.e_tgt[name])
    images = editor.sample(state, [0.0, 1.0], [0], num_inference_steps=3, progress=False).images
    assert images[(0.0, 0)].size == (32, 32) and images[(0.0, 0)].tobytes() != images[(1.0, 0)].tobytes()


def test_the_size_and_crop_ids_come_from_the_photo(sdxl_pipe, monkeypatch):
    family = StableDiffusionXLFamily(sdxl_pipe)
    seen = {}
    forward = sdxl_pipe.unet.forward
    monkeypatch.setattr(sdxl_pipe.unet, "forward",
                        lambda *args, **kwargs: seen.update(kwargs["added_cond_kwargs"]) or forward(*args, **kwargs))
    embedding = family.encode_text("a photo of a dog").embedding
    x_t = torch.zeros(2, 4, 24, 16)  # a 48 x 32 photo's latents, two noised copies
    family.base.predict(sdxl_pipe.unet, x_t, torch.tensor([10, 20]), {k: v.expand(2, *v.shape[1:]) for k, v in embedding.items()})
    assert seen["time_ids"].tolist() == [[48, 32, 0, 0, 48, 32]] * 2
    assert torch.equal(seen["text_embeds"][0], embedding["pooled_prompt_embeds"][0])


def test_the_empty_negative_prompt_is_zeros_as_sdxl_makes_it(sdxl_pipe):
    family = StableDiffusionXLFamily(sdxl_pipe)
    negative = family.encode_text("", allow_empty=True).embedding
    assert set(negative) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert all(not value.any() for value in negative.values())


def test_defaults_are_sdxls_own(sdxl_pipe, sdxl_folder):
    assert ImagicEditor(sdxl_pipe).defaults is SDXL_DEFAULTS is defaults_before_loading(sdxl_folder)
    assert SDXL_DEFAULTS.guidance_scale != 7.5  # not SD 1.5's


def test_the_base_model_is_unchanged_and_a_saved_edit_samples_the_same(sdxl_folder, tmp_path):
    editor = ImagicEditor.from_pretrained(sdxl_folder, device="cpu")
    before = snapshot(editor.pipe.unet)
    photo = tmp_path / "photo.png"
    scene_image(48, 40).save(photo)
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a sitting dog", "--model", str(sdxl_folder), "--out", str(out),
                 "--eta", "0.7", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["guidance_scale"] == SDXL_DEFAULTS.guidance_scale
    state = EditState.load(out / "state.safetensors")
    assert state.base_model["family"] == "stable-diffusion-xl" and set(state.e_opt) == {"prompt_embeds",
                                                                                         "pooled_prompt_embeds"}
    again = tmp_path / "again"
    assert main(["sample", str(out / "state.safetensors"), "--eta", "0.7", "--steps", "3", "--quiet", "--out",
                 str(again)]) == 0
    assert (again / "eta0.7_seed0.png").read_bytes() == (out / "eta0.7_seed0.png").read_bytes()
    after = snapshot(editor.pipe.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_state_of_another_family_is_refused(edit, sd1_pipe):
    _, state = edit
    with pytest.raises(StateMismatchError, match="different model architecture"):
        ImagicEditor(sd1_pipe).sample(state, [0.5], [0], num_inference_steps=2, progress=False)


def test_an_fp16_vae_encodes_in_fp32_and_keeps_its_dtype(sdxl_pipe):
    family = StableDiffusionXLFamily(sdxl_pipe)
    expected = family.base.encode_image(torch.zeros(1, 3, 32, 32))
    sdxl_pipe.vae.to(torch.float16)
    try:
        latents = family.base.encode_image(torch.zeros(1, 3, 32, 32))
        assert sdxl_pipe.vae.dtype == torch.float16  # given back
    finally:
        sdxl_pipe.vae.to(torch.float32)
    torch.testing.assert_close(latents, expected, rtol=1e-2, atol=1e-2)  # fp16 weights, fp32 arithmetic


def test_a_single_file_sdxl_checkpoint_loads_as_sdxl(sdxl_folder, tmp_path, monkeypatch):
    """Which pipeline a checkpoint goes to is imagic's part (diffusers converts the weights): SDXL's, by its config
    folder or by the tensors of its second text encoder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from imagic import loading

    calls = []
    for pipeline in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(pipeline, "from_single_file",
                            classmethod(lambda cls, path, **kwargs: calls.append(cls.__name__) or cls.__name__))
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}, sdxl)
    sd = tmp_path / "sd.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}, sd)
    assert loading.load_pipeline(sdxl, config="org/sdxl") == "StableDiffusionXLPipeline"  # by its tensors
    assert loading.load_pipeline(sd, config="org/sd15") == "StableDiffusionPipeline"
    assert loading.load_pipeline(sd, config=sdxl_folder) == "StableDiffusionXLPipeline"  # by its config folder


def test_imagic_batch_edits_with_sdxl(bench_folder, sdxl_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--model", str(sdxl_folder), "--out", str(out), *FAST]) == 0
    assert "2 edited, 0 already" in capsys.readouterr().out
    assert (out / "dog.png-a_photo_of_a_sitting_dog.png").is_file()
