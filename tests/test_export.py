"""Exported edits load in plain diffusers and sample what imagic samples; kohya's file converts back to the same LoRA."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from imagic import ImagicEditor, denoisers
from imagic.cli import main
from imagic.errors import ExportError, OutputExistsError
from imagic.export import KOHYA_FILE, LORA_FILE, RECIPE_FILE, export_edit, kohya_name
from imagic.settings import StageSettings
from imagic.stages import interpolate

from helpers import pixels, quick_settings, scene_image

ETA, SEED, STEPS, GUIDANCE = 0.7, 3, 6, 5.0
RANK, ALPHA = 4, 6.0  # alpha != rank: the LoRA's scale, 1.5, must reach every reader


def _train(pipe, method: str, embedding_steps: int, fine_tune_steps: int):
    settings = quick_settings(method, embedding=StageSettings(embedding_steps, 5e-2), lora_rank=RANK, lora_alpha=ALPHA,
                              fine_tune=StageSettings(fine_tune_steps, 1e-2 if method == "lora" else 1e-3))
    editor = ImagicEditor(pipe)
    return editor, editor.train(scene_image(32, 32), "a photo of a sitting dog", settings, progress=False)


def _plain(pipe):
    """The same model as a plain diffusers pipeline of copies: a LoRA loaded into it stays out of the session's pipes."""
    plain = type(pipe)(**{name: copy.deepcopy(part) for name, part in pipe.components.items()})
    plain.set_progress_bar_config(disable=True)
    return plain


def _lora_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(module, LoraLayer) for module in model.modules())


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def lora_edit(request, tmp_path_factory):
    """A tiny LoRA edit of each UNet family, exported."""
    editor, state = _train(request.getfixturevalue(f"{request.param}_pipe"), "lora", 2, 4)
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    export_edit(state, out, eta=ETA)
    return editor, state, out


@pytest.fixture(scope="module")
def full_edit(sd1_pipe):
    return _train(sd1_pipe, "full", 0, 1)


def test_lora_export_samples_in_plain_diffusers_what_imagic_samples(lora_edit):
    editor, state, out = lora_edit
    ours = editor.sample(state, [ETA], [SEED], strength=1.0, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         progress=False).images[(ETA, SEED)]
    plain = _plain(editor.pipe)
    embedding = load_file(out / f"embedding_eta{ETA:g}.safetensors")
    assert set(embedding) == set(state.e_tgt)  # prompt_embeds, and SDXL's pooled_prompt_embeds

    plain.load_lora_weights(out, weight_name=LORA_FILE)
    # The negative embedding: the pipeline's own for an empty negative prompt, as imagic's default.
    theirs = plain(**embedding, height=state.height, width=state.width, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED)).images[0]
    difference = np.abs(pixels(ours) - pixels(theirs))
    assert difference.max() <= 3 and difference.mean() < 0.5
    assert _lora_layers(editor.pipe.unet) == 0 and not hasattr(editor.pipe.unet, "peft_config")


def test_kohya_file_converts_back_to_the_diffusers_lora(lora_edit):
    editor, state, out = lora_edit
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = []
    for name in (None, LORA_FILE, KOHYA_FILE):
        plain = _plain(editor.pipe)
        if name is not None:
            plain.load_lora_weights(out, weight_name=name)  # diffusers' own kohya converter for the kohya file
            assert _lora_layers(plain.unet) == len(state.weights["unet"]) // 2  # every layer, the convolutions too
        with torch.no_grad():
            outputs.append(editor.family.base.predict(plain.unet, x, torch.tensor([500]), state.e_tgt))
    base, from_diffusers, from_kohya = outputs
    assert torch.allclose(from_diffusers, from_kohya, atol=1e-5)
    assert not torch.allclose(base, from_diffusers, atol=1e-2)  # the LoRA matters
    kohya = load_file(out / KOHYA_FILE)
    assert all(float(t) == ALPHA for name, t in kohya.items() if name.endswith(".alpha"))
    sdxl = editor.family.name == "stable-diffusion-xl"  # the original UNet's names, as kohya's SDXL trainer writes
    block = "input_blocks_3_1" if sdxl else "down_blocks_1_attentions_0"  # tiny SDXL: layers_per_block 1
    if sdxl:
        assert f"lora_unet_{block}_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    with safe_open(str(out / KOHYA_FILE), framework="pt") as handle:
        assert handle.metadata()["ss_network_alpha"] == f"{ALPHA:g}"


def test_sdxl_base_layout_kohya_names_convert_back_in_diffusers():
    """SDXL base's UNet (layers_per_block 2): the names kohya's SDXL files use, mapped back by diffusers' loader."""
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "down_blocks.2.resnets.1.conv1": "input_blocks_8_0_in_layers_2",
        "down_blocks.0.resnets.0.time_emb_proj": "input_blocks_1_0_emb_layers_1",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj": "output_blocks_2_1_transformer_blocks_0_ff_net_0_proj",
        "up_blocks.2.resnets.0.conv_shortcut": "output_blocks_6_0_skip_connection",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": "output_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
    }
    kohya = {}
    for module, name in expected.items():
        assert kohya_name(module, "stable-diffusion-xl", 2) == f"lora_unet_{name}"
        kohya[f"lora_unet_{name}.lora_down.weight"] = kohya[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(1, 1)
    mapped = _maybe_map_sgm_blocks_to_diffusers(kohya, SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    # diffusers' older attention naming (attn1.processor.to_q) is what its loader injects LoRA by, as the round trip shows
    back = {name.removeprefix("unet.").split(".lora_A.")[0].replace(".processor.", ".")
            for name in convert_unet_state_dict_to_peft(converted) if ".lora_A." in name}
    assert back == set(expected)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_transformer_lora_exports_in_diffusers_format(kind, request, tmp_path):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    editor, state = _train(pipe, "lora", 0, 1)
    written = {path.name for path in export_edit(state, tmp_path)}  # eta: the model's default, 0.7
    assert written == {LORA_FILE, "e_tgt.safetensors", "e_opt.safetensors", "embedding_eta0.7.safetensors", RECIPE_FILE}
    mixed = load_file(tmp_path / "embedding_eta0.7.safetensors")
    assert all(torch.equal(mixed[name], value) for name, value in interpolate(state.e_tgt, state.e_opt, 0.7).items())
    plain = _plain(pipe)
    plain.load_lora_weights(tmp_path)  # finds diffusers' default file name
    ours = denoisers.edited_denoiser(pipe.transformer, "lora", state.weights["transformer"], RANK, ALPHA,
                                     targets=editor.family.base.lora_targets)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, base = (editor.family.base.predict(model, x, torch.tensor([500.0]), state.e_tgt)
                      for model in (ours, plain.transformer, pipe.transformer))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)


def test_full_fine_tune_exports_a_unet_folder_that_from_pretrained_loads(full_edit, tmp_path):
    editor, state = full_edit
    export_edit(state, tmp_path, editor=editor)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert set(loaded) == set(state.weights["unet"])
    assert all(torch.equal(loaded[name], value) for name, value in state.weights["unet"].items())
    assert not (tmp_path / LORA_FILE).exists() and "UNet2DConditionModel.from_pretrained" in (tmp_path / RECIPE_FILE).read_text()


def test_existing_output_is_refused_and_nothing_written(full_edit, tmp_path):
    _, state = full_edit
    (tmp_path / RECIPE_FILE).write_text("mine")
    with pytest.raises(OutputExistsError):
        export_edit(state, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [RECIPE_FILE] and (tmp_path / RECIPE_FILE).read_text() == "mine"
    export_edit(state, tmp_path, overwrite=True)
    assert (tmp_path / "unet" / "config.json").exists() and (tmp_path / RECIPE_FILE).read_text() != "mine"


def test_an_overwriting_export_leaves_only_its_own_files(full_edit, lora_edit, tmp_path):
    _, full_state = full_edit
    _, lora_state, _ = lora_edit
    export_edit(full_state, tmp_path, eta=1.0)
    (tmp_path / "mine.txt").write_text("mine")
    written = export_edit(lora_state, tmp_path, eta=1.2, overwrite=True)
    names = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}
    assert names == {str(p.relative_to(tmp_path)) for p in written} | {"mine.txt"}
    assert not (tmp_path / "unet").exists() and not (tmp_path / "embedding_eta1.safetensors").exists()


def test_state_without_fine_tuning_or_of_another_family_is_refused(full_edit, tmp_path):
    _, state = full_edit
    with pytest.raises(ExportError, match="no fine-tuned weights"):
        export_edit(dataclasses.replace(state, method="none", weights={}), tmp_path)
    other = dataclasses.replace(state, base_model={**state.base_model, "family": "deepfloyd-if"})
    with pytest.raises(ExportError, match="stable-diffusion, stable-diffusion-xl, stable-diffusion-3, flux"):
        export_edit(other, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_exports_and_refuses_in_one_line(full_edit, sd1_folder, sdxl_folder, tmp_path, capsys):
    _, state = full_edit
    path, out = tmp_path / "state.safetensors", tmp_path / "out"
    state.save(path)
    assert main(["export", str(path), str(out), "--eta", "0.8", "--model", str(sd1_folder), "--quiet"]) == 0
    assert (out / "embedding_eta0.8.safetensors").exists() and (out / "unet" / "config.json").exists()
    capsys.readouterr()
    assert main(["export", str(path), str(out)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["export", str(path), str(tmp_path / "other"), "--model", str(sdxl_folder), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model" in err[0]
    untrained = dataclasses.replace(state, method="none", weights={}, stages={"embedding": "done"},
                                    losses={"embedding": state.losses["embedding"]})
    untrained.save(path, overwrite=True)
    assert main(["export", str(path), str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fine-tuned weights" in err[0] and not (tmp_path / "other").exists()
