"""SD3 and FLUX on tiny pipelines: flow matching's noised input and velocity target against the scheduler's own
maths, timesteps drawn from the seed as the models' recipe draws them, both text tensors optimised and
interpolated, FLUX's guidance as an input without a negative pass, and edits through the API, the command line
and `imagic batch`."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from imagic.cli import main
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError, StateMismatchError
from imagic.families import FlowMatchingSchedule, draw_timesteps, family_for, training_target
from imagic.families.flux import FLUX_DEFAULTS, FluxFamily
from imagic.families.qwen_image import QWEN_IMAGE_DEFAULTS, QwenImageFamily
from imagic.families.sd3 import SD3_DEFAULTS, StableDiffusion3Family
from imagic.loading import defaults_before_loading
from imagic.state import EditState

from helpers import quick_settings, scene_image, snapshot

KINDS = ("sd3", "flux")
FAMILIES = {"sd3": (StableDiffusion3Family, SD3_DEFAULTS), "flux": (FluxFamily, FLUX_DEFAULTS),
            "qwen": (QwenImageFamily, QWEN_IMAGE_DEFAULTS)}
FAST = ["--embedding-steps", "3", "--finetune-steps", "3", "--method", "lora", "--lora-rank", "2", "--steps", "2",
        "--resolution", "32", "--quiet"]


@pytest.fixture(scope="module", params=KINDS)
def edit(request):
    editor = ImagicEditor(request.getfixturevalue(f"{request.param}_pipe"))
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora", resolution=32), progress=False)
    return request.param, editor, state


def _schedule(pipe) -> FlowMatchingSchedule:
    schedule = family_for(pipe).base.noise_scheduler
    assert isinstance(schedule, FlowMatchingSchedule)
    return schedule


@pytest.mark.parametrize("kind", KINDS)
def test_the_noised_input_and_the_velocity_follow_the_schedulers_own_maths(kind, request):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    schedule, reference = _schedule(pipe), FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    t = draw_timesteps(schedule, 6, generator)
    x0, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), reference.scale_noise(x0, t, noise))
    # One Euler step of the model's own sampler along the target velocity stays on the straight path.
    index = 400
    now, later = reference.timesteps[index], reference.timesteps[index + 1]
    x_t = schedule.add_noise(x0[:1], noise[:1], now.reshape(1))
    velocity = training_target(schedule, x0[:1], noise[:1], now.reshape(1))
    stepped = reference.step(velocity, now, x_t).prev_sample
    torch.testing.assert_close(stepped, schedule.add_noise(x0[:1], noise[:1], later.reshape(1)))


@pytest.mark.parametrize("kind", KINDS)
def test_timesteps_are_drawn_from_the_seed_logit_normal_through_the_models_table(kind, request):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    schedule = _schedule(pipe)
    draws = draw_timesteps(schedule, 4000, torch.Generator().manual_seed(1))
    assert torch.equal(draws, draw_timesteps(schedule, 4000, torch.Generator().manual_seed(1)))
    assert torch.isin(draws, schedule.scheduler.timesteps).all()
    sigmas = schedule.sigmas(draws)
    # Logit-normal is middle-heavy (uniform would put 10% below 0.1); SD3's shift of 3 moves the median 0.5 to 0.75.
    shift = 1.0 if pipe.scheduler.config.use_dynamic_shifting else pipe.scheduler.config.shift
    median = shift * 0.5 / (1 + (shift - 1) * 0.5)
    assert abs(sigmas.median().item() - median) < 0.03
    unshifted = sigmas / (shift - (shift - 1) * sigmas)
    assert (unshifted < 0.1).float().mean() < 0.03


def test_both_text_tensors_are_optimised_and_interpolated(edit):
    kind, editor, state = edit
    assert isinstance(editor.family, FAMILIES[kind][0]) and state.levels == ["transformer"]
    assert set(state.e_opt) == {"prompt_embeds", "pooled_prompt_embeds"}
    for name in state.e_opt:
        assert not torch.equal(state.e_opt[name], state.e_tgt[name])
    images = editor.sample(state, [0.0, 1.0], [0], num_inference_steps=2, progress=False).images
    assert images[(0.0, 0)].size == (32, 32) and images[(0.0, 0)].tobytes() != images[(1.0, 0)].tobytes()


def test_flux_guides_by_an_input_without_a_negative_pass(flux_pipe, monkeypatch):
    editor = ImagicEditor(flux_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora", resolution=32), progress=False)
    calls = []
    forward = type(flux_pipe.transformer).forward  # on the class: sampling runs a copy of the loaded model
    monkeypatch.setattr(type(flux_pipe.transformer), "forward",
                        lambda self, *args, **kwargs: calls.append(kwargs) or forward(self, *args, **kwargs))
    editor.sample(state, [0.6, 0.8], [0], num_inference_steps=2, guidance_scale=2.5, batch_size=2, progress=False)
    assert calls and all(call["hidden_states"].shape[0] == 2 for call in calls)  # one row per image, none negative
    assert all(call["guidance"].tolist() == [2.5, 2.5] for call in calls)
    with pytest.raises(SettingsError, match="negative prompt out"):
        editor.sample(state, [0.6], [0], negative_prompt="blurry", num_inference_steps=2, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_refuses_what_a_flow_model_cannot_do(kind, request, sd1_pipe):
    editor = ImagicEditor(request.getfixturevalue(f"{kind}_pipe"))
    with pytest.raises(SettingsError, match="'ddim' does not fit this model, which is trained by flow matching"):
        editor.check_sampling([0.7], [0], scheduler="ddim")
    with pytest.raises(SettingsError, match="cannot start from an inversion"):
        editor.check_sampling([0.7], [0], invert=True)
    editor.check_sampling([0.7], [0], scheduler="FlowMatchEulerDiscreteScheduler", num_inference_steps=4)
    with pytest.raises(SettingsError, match="which is not trained by flow matching"):
        ImagicEditor(sd1_pipe).check_sampling([0.7], [0], scheduler="FlowMatchEulerDiscreteScheduler")


@pytest.mark.parametrize("kind", FAMILIES)
def test_defaults_are_the_familys_own(kind, request):
    family, defaults = FAMILIES[kind]
    assert ImagicEditor(request.getfixturevalue(f"{kind}_pipe")).defaults is defaults
    assert defaults_before_loading(request.getfixturevalue(f"{kind}_folder")) is defaults and defaults.method == "lora"


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_cli_edit_leaves_the_model_as_it_was_and_its_state_samples_the_same(kind, request, tmp_path):
    folder = request.getfixturevalue(f"{kind}_folder")
    editor = ImagicEditor.from_pretrained(folder, device="cpu")
    before = snapshot(editor.pipe.transformer)
    photo = tmp_path / "photo.png"
    scene_image(48, 40).save(photo)
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a sitting dog", "--model", str(folder), "--out", str(out),
                 "--eta", "0.7", "--strength", "0.8", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"]["guidance_scale"] == FAMILIES[kind][1].guidance_scale
    state = EditState.load(out / "state.safetensors")
    assert state.base_model["family"] == FAMILIES[kind][0].name and state.levels == ["transformer"]
    again = tmp_path / "again"
    assert main(["sample", str(out / "state.safetensors"), "--image", str(photo), "--eta", "0.7", "--strength", "0.8",
                 "--steps", "2", "--quiet", "--out", str(again)]) == 0
    assert (again / "eta0.7_seed0.png").read_bytes() == (out / "eta0.7_seed0.png").read_bytes()
    after = snapshot(editor.pipe.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_several_etas_start_from_the_photo_in_one_batch(edit):
    kind, editor, state = edit
    output = editor.sample(state, [0.5, 1.0], [0, 1], image=scene_image(), strength=0.6, num_inference_steps=3,
                           progress=False)
    assert len(output.images) == 4 and all(image.size == (32, 32) for image in output.images.values())
    alone = editor.sample(state, [1.0], [1], image=scene_image(), strength=0.6, num_inference_steps=3, progress=False)
    assert alone.images[(1.0, 1)].tobytes() == output.images[(1.0, 1)].tobytes()


def test_a_state_of_another_family_is_refused(edit, sd3_pipe, flux_pipe):
    kind, _, state = edit
    other = flux_pipe if kind == "sd3" else sd3_pipe
    with pytest.raises(StateMismatchError):
        ImagicEditor(other).sample(state, [0.5], [0], num_inference_steps=2, progress=False)


@pytest.mark.parametrize("kind", FAMILIES)
def test_imagic_batch_edits_with_a_flow_model(kind, request, bench_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--model", str(request.getfixturevalue(f"{kind}_folder")), "--out",
                 str(out), *FAST]) == 0
    assert "2 edited, 0 already" in capsys.readouterr().out
    assert (out / "dog.png-a_photo_of_a_sitting_dog.png").is_file()


def test_single_file_checkpoints_of_sd3_and_flux_load_into_their_pipelines(sd3_folder, tmp_path, monkeypatch):
    """Which pipeline a checkpoint goes to is imagic's part (diffusers converts the weights): by the tensors'
    names, or by the config folder's pipeline."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
    from safetensors.torch import save_file

    from imagic import loading

    for pipeline in (StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline):
        monkeypatch.setattr(pipeline, "from_single_file", classmethod(lambda cls, path, **kwargs: cls.__name__))
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    sd3, flux = tmp_path / "sd3.safetensors", tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.ones(2)}, sd3)
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.ones(2)}, flux)
    assert loading.load_pipeline(sd3, config="org/sd3") == "StableDiffusion3Pipeline"
    assert loading.load_pipeline(flux, config="org/flux") == "FluxPipeline"
    assert loading.load_pipeline(flux, config=sd3_folder) == "StableDiffusion3Pipeline"  # the folder says


def test_sd3_and_flux_load_in_bf16_on_gpus_that_have_it(sd3_folder, flux_folder, sd1_folder, monkeypatch):
    """They were trained and are published in bf16; other families keep fp16; the CPU fp32."""
    from imagic.loading import default_dtype

    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for folder in (sd3_folder, flux_folder):
        assert default_dtype(gpu, defaults_before_loading(folder)) == torch.bfloat16
        assert default_dtype(torch.device("cpu"), defaults_before_loading(folder)) == torch.float32
    assert default_dtype(gpu, defaults_before_loading(sd1_folder)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert default_dtype(gpu, defaults_before_loading(flux_folder)) == torch.float16
