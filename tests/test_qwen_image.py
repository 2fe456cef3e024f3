"""Qwen-Image, the family added as one module: its text with an attention mask beside it, packed video-VAE
latents, true classifier-free guidance, single files. (The command line, batch and its defaults are tested with
the other flow families in test_flow_families.py.)"""


import pytest
import torch
from diffusers import QwenImagePipeline

from imagic.editor import ImagicEditor
from imagic.errors import ModelLoadError
from imagic.families import FlowMatchingSchedule, family_for
from imagic.families.qwen_image import QwenImageFamily

from helpers import quick_settings, scene_image

FAST = ["--embedding-steps", "3", "--finetune-steps", "3", "--method", "lora", "--lora-rank", "2", "--steps", "2",
        "--resolution", "32", "--quiet"]


@pytest.fixture(scope="module")
def edit(qwen_pipe):
    editor = ImagicEditor(qwen_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora", resolution=32), progress=False)
    return editor, state


def test_the_text_is_optimised_and_its_attention_mask_travels_beside_it(qwen_pipe, edit):
    family = family_for(qwen_pipe)
    assert isinstance(family, QwenImageFamily) and isinstance(family.base.noise_scheduler, FlowMatchingSchedule)
    text = family.encode_text("a photo of a red dog")
    assert set(text.embedding) == {"prompt_embeds"} and set(text.extras) == {"prompt_embeds_mask"}
    mask = text.extras["prompt_embeds_mask"]
    assert mask.dtype == torch.long and mask.shape == text.embedding["prompt_embeds"].shape[:2] and mask.all()
    assert family.encode_text("", allow_empty=True).embedding["prompt_embeds"].shape[1] < mask.shape[1]  # its own length
    _, state = edit
    assert not torch.equal(state.e_opt["prompt_embeds"], state.e_tgt["prompt_embeds"])
    assert torch.equal(state.text_extras["prompt_embeds_mask"], mask.cpu())  # kept, not optimised


def test_the_training_prediction_is_the_pipelines_own_transformer_call(qwen_pipe, monkeypatch):
    """The level calls the transformer as the pipeline's loop does: same packed input, same output, unpacked."""
    family = family_for(qwen_pipe)
    text = family.encode_text("a photo of a red dog")
    seen = []
    forward = type(qwen_pipe.transformer).forward
    monkeypatch.setattr(type(qwen_pipe.transformer), "forward",
                        lambda self, *args, **kwargs: seen.append(kwargs) or forward(self, *args, **kwargs))
    qwen_pipe(prompt_embeds=text.embedding["prompt_embeds"], prompt_embeds_mask=text.extras["prompt_embeds_mask"],
              height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
              output_type="latent")
    call = seen[0]
    packed = call["hidden_states"]
    latents = QwenImagePipeline._unpack_latents(packed, 32, 32, qwen_pipe.vae_scale_factor)[:, :, 0]
    with torch.no_grad():
        expected = forward(qwen_pipe.transformer, **call)[0]
        ours = family.base.predict(qwen_pipe.transformer, latents, call["timestep"] * 1000, text.embedding,
                                   {"prompt_embeds_mask": text.extras["prompt_embeds_mask"]})
    unpacked = QwenImagePipeline._unpack_latents(expected, 32, 32, qwen_pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(ours, unpacked)


def test_the_photo_goes_into_the_normalised_latents_of_one_frame(qwen_pipe):
    level = family_for(qwen_pipe).base
    x0 = level.encode_image(torch.zeros(1, 3, 32, 32))
    assert x0.shape == (1, 4, 16, 16) and x0.dtype == torch.float32
    raw = qwen_pipe.vae.encode(torch.zeros(1, 3, 1, 32, 32)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(qwen_pipe.vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(qwen_pipe.vae.config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(x0, (raw - mean) / std)


def test_it_samples_with_true_guidance_and_a_negative_pass(edit, monkeypatch):
    editor, state = edit
    calls = []
    forward = type(editor.pipe.transformer).forward
    monkeypatch.setattr(type(editor.pipe.transformer), "forward",
                        lambda self, *args, **kwargs: calls.append(kwargs) or forward(self, *args, **kwargs))
    output = editor.sample(state, [0.0, 1.0], [0], num_inference_steps=2, negative_prompt="blurry", progress=False)
    assert output.images[(0.0, 0)].size == (32, 32)
    assert output.images[(0.0, 0)].tobytes() != output.images[(1.0, 0)].tobytes()
    lengths = {call["encoder_hidden_states"].shape[1] for call in calls}
    assert len(calls) == 4 and len(lengths) == 2  # a conditional and a negative pass, each with its own length


def test_a_single_file_is_told_by_its_tensors_and_refused_with_the_fix(tmp_path):
    """diffusers loads Qwen-Image from model folders only: a single file is recognised and sent there."""
    from safetensors.torch import save_file

    from imagic.loading import load_pipeline

    path = tmp_path / "qwen-image.safetensors"
    save_file({"txt_norm.weight": torch.ones(2), "transformer_blocks.0.img_mod.1.weight": torch.ones(2)}, path)
    with pytest.raises(ModelLoadError, match="QwenImagePipeline checkpoint, which diffusers loads from a model folder"):
        load_pipeline(path)
