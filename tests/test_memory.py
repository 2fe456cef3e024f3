"""Memory levers (imagic/memory.py) and the budget that picks them (imagic/memory_budget.py): each keeps the loaded
model as it was and the edit state's format unchanged."""

import json
import math
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from imagic import ImagicEditor
from imagic.batch import edit_pairs
from imagic.budget import _saved_bytes
from imagic.cli import main
from imagic.cli_options import parse
from imagic.errors import SettingsError
from imagic.memory import MemorySettings, TrainingLevers, encoders, parse_bytes
from imagic.memory_budget import choose_levers, estimate_peak
from imagic.settings import StageSettings, TrainSettings
from imagic.state import EditState

from helpers import pixels, quick_settings, scene_image

TEXT = "a photo of a sitting dog"


def _fast(method: str = "lora") -> TrainSettings:
    return quick_settings(method, embedding=StageSettings(3, 5e-2), fine_tune=StageSettings(3, 2e-3))


def _header(state: EditState, path) -> dict:
    """The saved state's JSON header (as EditState.load reads it)."""
    state.save(path)
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["imagic"])


@pytest.fixture(scope="module")
def editor(sd1_pipe):
    return ImagicEditor(sd1_pipe)


def _pipeline_tensors(pipe) -> dict:
    return {(name, key): (tensor, tensor.detach().clone())
            for name in ("unet", "vae", "text_encoder") for key, tensor in getattr(pipe, name).state_dict(keep_vars=True).items()}


def _unchanged(pipe, before: dict) -> bool:
    """The same tensor objects as before, holding the same values."""
    now = {(name, key): tensor for name in ("unet", "vae", "text_encoder")
           for key, tensor in getattr(pipe, name).state_dict(keep_vars=True).items()}
    return now.keys() == before.keys() and all(now[k] is t and torch.equal(t, values) for k, (t, values) in before.items())


def _edit(editor, memory: MemorySettings, callback=None):
    state = editor.train(scene_image(), TEXT, _fast(), progress=False, memory=memory, callback=callback)
    image = editor.sample(state, [0.7], [0], num_inference_steps=3, progress=False).images[(0.7, 0)]
    return state, pixels(image)


@pytest.fixture(scope="module")
def plain(editor):
    return _edit(editor, MemorySettings())


@pytest.mark.parametrize("qtype, tolerance", [("int8", 1.0), ("int4", 3.0)])
def test_lora_over_a_quantized_base_trains_samples_close_and_leaves_the_model_as_loaded(editor, plain, qtype,
                                                                                       tolerance, tmp_path):
    before = _pipeline_tensors(editor.pipe)
    seen = []

    def during(stage: str, step: int, loss: float) -> None:  # the loaded UNet is out of memory while it trains
        seen.append(sum(p.numel() for p in editor.pipe.unet.parameters()))

    state, image = _edit(editor, MemorySettings(quantize_base=qtype), during)
    assert set(seen) == {0}
    assert _unchanged(editor.pipe, before)
    assert all(np.isfinite(losses).all() for losses in state.losses.values())
    # Mean absolute difference per pixel (0-255) from the same edit over the unquantized base: 0.09 for int8 and
    # 0.56 for int4 on this model in a longer check by hand (15 + 15 steps; docs/benchmarks.md).
    assert np.abs(image - plain[1]).mean() < tolerance
    # Nothing of the levers in the state: the same header fields, the same settings.
    header, plain_header = _header(state, tmp_path / "q.safetensors"), _header(plain[0], tmp_path / "p.safetensors")
    assert header.keys() == plain_header.keys() and header["settings"] == plain_header["settings"]
    assert EditState.load(tmp_path / "q.safetensors").weights.keys() == plain[0].weights.keys()


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_a_quantized_copy_frees_each_float_layer_as_it_goes(editor, qtype, monkeypatch):
    """Each float linear layer is gone once its quantized one replaces it: holding them all (as a first version
    did) was a second whole model, and SDXL's run out of 24 GB."""
    from optimum import quanto

    replaced, alive, quantize = [], [], quanto.quantize_module

    def watched(module, **options):
        alive.append(sum(ref() is not None for ref in replaced))  # the float layers quantized before this one
        replaced.append(weakref.ref(module))
        return quantize(module, **options)

    monkeypatch.setattr(quanto, "quantize_module", watched)
    levers = TrainingLevers(MemorySettings(quantize_base=qtype))
    with levers.active(editor.family):
        view = levers.frozen_base(editor.family.base)
        assert len(replaced) > 2 and set(alive) == {0} and all(ref() is None for ref in replaced)
        x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        view(x0, torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 77, 32)).sample.square().mean().backward()
        assert _saved_bytes(lambda: view(x0, torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 77, 32)).sample,
                            view) > 0 and torch.isfinite(x0.grad).all()


def test_the_quantized_copy_is_gone_before_the_loaded_base_comes_back(editor, monkeypatch):
    """Else the loaded base's weights and the quantized copy are in memory together at the end of training
    (SDXL's UNet at 256 px on the CPU: a 14.9 GiB peak, against 12.4 for the whole edit over the loaded base)."""
    import gc

    from imagic import denoisers, memory

    copies, alive_at_read_back = [], []
    build, read_back = memory.quantized_copy, denoisers._read_back

    def built(*args, **kwargs):
        copy = build(*args, **kwargs)
        copies.append(weakref.ref(copy))
        return copy

    def reading_back(*args, **kwargs):
        gc.collect()
        alive_at_read_back.append(sum(ref() is not None for ref in copies))
        return read_back(*args, **kwargs)

    monkeypatch.setattr(memory, "quantized_copy", built)
    monkeypatch.setattr(denoisers, "_read_back", reading_back)
    _edit(editor, MemorySettings(quantize_base="int8"))
    assert len(copies) == 1 and alive_at_read_back == [0]


def test_offloaded_encoders_leave_memory_while_training_and_change_nothing(editor, plain):
    before = _pipeline_tensors(editor.pipe)
    seen = []

    def during(stage: str, step: int, loss: float) -> None:
        seen.append(sum(p.numel() for module in encoders(editor.family).values() for p in module.parameters()))

    state, image = _edit(editor, MemorySettings(offload_encoders=True), during)
    assert set(encoders(editor.family)) == {"vae", "text_encoder"}
    assert seen and set(seen) == {0}
    assert _unchanged(editor.pipe, before)
    assert state.losses == plain[0].losses and np.array_equal(image, plain[1])


def test_a_quantized_base_is_for_lora_only(editor):
    with pytest.raises(SettingsError, match="quantized base is for LoRA"):
        editor.train(scene_image(), TEXT, _fast("full"), progress=False, memory=MemorySettings(quantize_base="int8"))


def _rungs(editor, settings):
    """The estimate with no lever, then with each lever of the ladder added in turn (LoRA on the CPU)."""
    steps = [({}, {}), ({}, {"offload_encoders": True}), ({"gradient_checkpointing": True}, {}),
             ({}, {"quantize_base": "int8"}), ({}, {"quantize_base": "int4"})]
    memory, rungs = MemorySettings(), []
    for trained, memorised in steps:
        settings, memory = replace(settings, **trained), replace(memory, **memorised)
        rungs.append((settings, memory, estimate_peak(editor.family, settings, memory, (32, 32))))
    return rungs


def test_a_budget_picks_the_cheapest_levers_that_fit(editor):
    rungs = _rungs(editor, _fast())
    peaks = [peak for _, _, peak in rungs]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)  # every lever takes something off
    names = ["offload-encoders", "gradient-checkpointing", "quantize-base int8", "quantize-base int4"]
    for count, (settings, memory, peak) in enumerate(rungs):
        chosen_settings, chosen, line = choose_levers(editor.family, _fast(), MemorySettings(max_memory=f"{math.ceil(peak)}B"),
                                                      (32, 32))
        assert (chosen_settings.gradient_checkpointing, chosen.offload_encoders, chosen.quantize_base) == (
            settings.gradient_checkpointing, memory.offload_encoders, memory.quantize_base)
        assert line.startswith("max memory") and (", ".join(names[:count]) or "no lever needed") in line
        assert "\n" not in line


def test_full_fine_tuning_s_estimate_leaves_out_the_loaded_denoiser_it_offloads(editor):
    """Stage 2 moves the loaded denoiser out while its fp32 copy trains: with no activations to speak of (one latent
    pixel) and the encoders out, the estimate is the copy's weights, gradients and Adam's moments alone."""
    full = replace(_fast("full"), gradient_checkpointing=False)
    params = sum(p.numel() for p in editor.family.base.denoiser.parameters())
    peak = estimate_peak(editor.family, full, MemorySettings(offload_encoders=True), (1, 1))
    assert params * 16 <= peak < params * (16 + editor.family.base.denoiser.dtype.itemsize)


def test_a_budget_nothing_fits_is_one_line(editor):
    with pytest.raises(SettingsError) as error:
        choose_levers(editor.family, _fast(), MemorySettings(max_memory="1KiB"), (32, 32))
    message = str(error.value)
    assert "\n" not in message and "even with offload-encoders, gradient-checkpointing, quantize-base int8, " \
                                   "quantize-base int4" in message and "lower --resolution" in message


@pytest.mark.parametrize("text, expected", [("24GiB", 24 << 30), ("24 GB", 24 * 10**9), ("512MiB", 512 << 20)])
def test_amounts_of_memory_are_read_as_written(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["24 apples", "-1GiB", "GiB", "nanGiB"])
def test_a_malformed_amount_is_refused(text):
    with pytest.raises(SettingsError, match="max memory must be an amount"):
        MemorySettings(max_memory=text)


def test_the_command_line_levers_reach_the_editor(tmp_path, capsys):
    request = parse(["edit", "photo.png", TEXT, "--offload-encoders", "--quantize-base", "int4", "--max-memory", "8GiB"])
    assert request.memory == MemorySettings(True, "int4", "8GiB")
    assert parse(["train", "photo.png", TEXT, "--state", "s.safetensors"]).memory == MemorySettings()
    photo = tmp_path / "photo.png"
    scene_image().save(photo)
    # A budget nothing fits is refused by the editor, before a step: the option reached it.
    code = main(["edit", str(photo), TEXT, "--out", str(tmp_path / "out"), "--max-memory", "1KiB", "--quiet"])
    assert code != 0 and "max memory 0.0 MiB: this full fine-tuning needs about" in capsys.readouterr().err


def test_a_batch_trains_every_pair_with_the_levers(tmp_path):
    from imagic.batch import EditPair

    class Recorder:
        def train(self, photo, text, settings, progress, memory):
            raise SettingsError(f"memory {memory.quantize_base}")

    (tmp_path / "a.png").write_bytes(b"")
    records = edit_pairs(Recorder(), [EditPair("a.png", TEXT)], tmp_path, tmp_path, _fast(), eta=0.7, seed=0,
                         sample_settings=None, progress=False, memory=MemorySettings(quantize_base="int8"))
    assert records[0]["reason"] == "memory int8"


def test_a_batch_records_a_quantized_base_and_redoes_the_outputs_made_without_it(sd1_folder, tmp_path, capsys):
    folder, out = tmp_path / "bench", tmp_path / "out"
    folder.mkdir()
    scene_image(32, 32, seed=1).save(folder / "dog.png")
    (folder / "input_list.json").write_text(json.dumps([{"img_name": "dog.png", "target_text": TEXT}]))
    args = ["batch", str(folder), "--model", str(sd1_folder), "--out", str(out), "--embedding-steps", "2",
            "--finetune-steps", "2", "--steps", "2", "--method", "lora", "--lora-rank", "2", "--quiet"]
    assert main([*args, "--offload-encoders"]) == 0
    [record] = json.loads((out / "summary.json").read_text())["outputs"].values()
    assert "memory" not in record  # offloading changes no output: a rerun without it keeps the output
    assert main(args) == 0 and "0 edited, 1 already" in capsys.readouterr().out
    assert main([*args, "--quantize-base", "int8"]) == 0
    shown = capsys.readouterr().out
    assert "made with other settings" in shown and "1 edited, 0 already" in shown
    [record] = json.loads((out / "summary.json").read_text())["outputs"].values()
    assert record["memory"] == {"quantize_base": "int8"}
