"""The three stages on tiny SD1 (epsilon) and SD2 (v-prediction) models."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from imagic import denoisers
from imagic.editor import ImagicEditor
from imagic.families import training_target
from imagic.image_io import image_to_tensor
from imagic.optimisation import Batch, make_optimizer, reconstruction_loss
from imagic.precision import Precision
from imagic.settings import StageSettings
from imagic.stages import interpolate, optimize_embedding

from helpers import optimise, quick_settings, scene_image


def _encoded(pipe):
    family = ImagicEditor(pipe).family
    image = image_to_tensor(scene_image().resize(family.native_resolution()[::-1]))
    return family.base, family.base.encode_image(image), family.encode_text("a photo of a red dog").embedding


@pytest.mark.parametrize("pipe_name", ["sd1_pipe", "sd2_pipe"])
def test_embedding_optimisation_lowers_the_loss_with_the_model_frozen(pipe_name, request):
    editor = ImagicEditor(request.getfixturevalue(pipe_name))
    settings = quick_settings(embedding=StageSettings(steps=30, learning_rate=5e-2))
    photo, level = editor.photo(scene_image(), settings), editor.family.base
    e_tgt = editor.family.encode_text("a photo of a red dog")
    e_opt, record = optimize_embedding(editor.family, photo, e_tgt, settings, editor.precision(settings))
    assert record.finished and len(record.losses) == 30
    frozen, x0 = denoisers.frozen_view(level.denoiser).eval(), photo.at(level)
    assert (reconstruction_loss(Batch(level, x0, e_opt), frozen, 16)
            < reconstruction_loss(Batch(level, x0, e_tgt.embedding), frozen, 16))
    assert all(p.grad is None for p in level.denoiser.parameters())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("pipe_name", ["sd1_pipe", "sd2_pipe"])
def test_fine_tuning_lowers_the_loss_for_e_opt(pipe_name, method, request):
    level, x0, e_tgt = _encoded(request.getfixturevalue(pipe_name))
    if method == "full":
        model, lr = denoisers.full_copy(level.denoiser), 5e-4
    else:
        model, lr = denoisers.add_lora(denoisers.frozen_view(level.denoiser), 4, 4.0, seed=0, targets=level.lora_targets), 3e-3
    before = reconstruction_loss(Batch(level, x0, e_tgt), model, 16)
    result = optimise(level, model.train(), x0, e_tgt, StageSettings(steps=30, learning_rate=lr))
    assert result.finished
    assert reconstruction_loss(Batch(level, x0, e_tgt), model, 16) < 0.9 * before


def test_v_prediction_model_trains_on_velocity(sd2_pipe):
    level, x0, _ = _encoded(sd2_pipe)
    scheduler = level.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    noise, t = torch.randn_like(x0), torch.tensor([700])
    alpha_bar = scheduler.alphas_cumprod[700]
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), expected)


def test_epsilon_model_trains_on_noise(sd1_pipe):
    level, x0, _ = _encoded(sd1_pipe)
    noise = torch.randn_like(x0)
    assert torch.equal(training_target(level.noise_scheduler, x0, noise, torch.tensor([10])), noise)


def test_interpolation_follows_eta():
    e_tgt, e_opt = {"prompt_embeds": torch.ones(1, 3, 2)}, {"prompt_embeds": torch.zeros(1, 3, 2)}
    assert torch.equal(interpolate(e_tgt, e_opt, 0.0)["prompt_embeds"], e_opt["prompt_embeds"])
    assert torch.equal(interpolate(e_tgt, e_opt, 1.0)["prompt_embeds"], e_tgt["prompt_embeds"])
    torch.testing.assert_close(interpolate(e_tgt, e_opt, 0.7)["prompt_embeds"], torch.full((1, 3, 2), 0.7))


def test_bf16_autocast_really_runs_in_bf16_with_fp32_master_weights(sd1_pipe):
    level, x0, e_tgt = _encoded(sd1_pipe)
    model = denoisers.add_lora(denoisers.frozen_view(level.denoiser), 4, 4.0, seed=0, targets=level.lora_targets)
    seen = []
    hook = model.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    result = optimise(level, model.train(), x0, e_tgt, StageSettings(steps=2, learning_rate=1e-3),
                      Precision(x0.device, torch.bfloat16))
    hook.remove()
    assert result.finished and seen == [torch.bfloat16, torch.bfloat16]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_is_fused_on_the_cpu_and_steps_like_torchs_loop(optimizer):
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    settings = StageSettings(steps=1, learning_rate=1e-2, optimizer=optimizer, weight_decay=0.1)
    fused = make_optimizer(weights, settings)
    loop = type(fused)(copies, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for params, opt in ((weights, fused), (copies, loop)):
            sum((p**2).sum() for p in params).backward()
            opt.step()
            opt.zero_grad()
    for w, c in zip(weights, copies):
        torch.testing.assert_close(w, c)


def test_adam_falls_back_to_torchs_choice_where_fused_is_unsupported():
    weights = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not make_optimizer(weights, StageSettings(steps=1, learning_rate=1e-2)).defaults["fused"]


@pytest.mark.parametrize("pipe_name", ["sd1_pipe", "if_pipe"])
def test_a_merged_lora_predicts_as_the_unmerged_one_and_leaves_the_loaded_model_as_it_was(pipe_name, request):
    level = ImagicEditor(request.getfixturevalue(pipe_name)).family.base
    before = {name: t.clone() for name, t in level.denoiser.state_dict().items()}
    lora = denoisers.add_lora(denoisers.frozen_view(level.denoiser), 4, 4.0, seed=0, targets=level.lora_targets)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the LoRA an effect to merge
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    weights = denoisers.trained_weights(lora, "lora")
    unmerged, merged = (denoisers.edited_denoiser(level.denoiser, "lora", weights, 4, 4.0, targets=level.lora_targets,
                                                  merge=merge) for merge in (False, True))
    x_t = torch.randn(1, level.denoiser.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    width = level.denoiser.config.encoder_hid_dim or level.denoiser.config.cross_attention_dim
    text = torch.randn(1, 8, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = [model(x_t, torch.tensor([500]), encoder_hidden_states=text).sample for model in (unmerged, merged)]
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert (outputs[0] - level.denoiser(x_t, torch.tensor([500]), encoder_hidden_states=text).sample).abs().max() > 1e-3
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    assert all(torch.equal(t, before[name]) for name, t in level.denoiser.state_dict().items())


def test_an_offloaded_model_gets_back_its_own_tensors_bit_for_bit_however_the_block_ends(sd1_pipe):
    unet = sd1_pipe.unet
    parameters = dict(unet.named_parameters())
    before = {name: t.detach().clone() for name, t in unet.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        with denoisers.offloaded(unet):
            assert all(p.numel() == 0 for p in unet.parameters())  # out of memory meanwhile
            raise KeyboardInterrupt
    assert all(parameters[name] is p for name, p in unet.named_parameters())  # the same objects
    assert all(torch.equal(t, before[name]) and t.dtype == before[name].dtype for name, t in unet.state_dict().items())


def test_a_model_that_cannot_be_offloaded_stays_in_memory_with_a_warning(sd1_pipe, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(denoisers, "save_file", full_disk)
    with pytest.warns(UserWarning, match="No space left on device"):
        with denoisers.offloaded(sd1_pipe.unet):
            assert all(p.numel() > 0 for p in sd1_pipe.unet.parameters())


def test_an_offloaded_model_leaves_memory_a_piece_at_a_time_and_a_disk_that_fills_midway_gives_it_all_back(
        sd1_pipe, monkeypatch):
    unet = sd1_pipe.unet
    before = {name: t.detach().clone() for name, t in unet.state_dict().items()}
    in_memory, save = [], denoisers.save_file

    def filling(piece, path):
        in_memory.append(sum(t.numel() for t in unet.state_dict().values()))
        if len(in_memory) == 3:
            raise OSError(28, "No space left on device")
        save(piece, path)

    monkeypatch.setattr(denoisers, "OFFLOAD_PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(denoisers, "save_file", filling)
    with pytest.warns(UserWarning, match="No space left on device"):
        with denoisers.offloaded(unet):
            pass
    assert in_memory[0] > in_memory[1] > in_memory[2]  # each piece written left memory before the next
    assert all(torch.equal(t, before[name]) for name, t in unet.state_dict().items())
