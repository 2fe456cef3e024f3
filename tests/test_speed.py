"""Fewer, fuller steps: the reconstruction check's early stop (recorded in the state and the summary), stage 1 without
adapters, the torch.compile switch, and the options reaching the settings from the command line."""

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from imagic import denoisers, optimisation
from imagic.cli import main
from imagic.cli_options import parse
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError
from imagic.settings import StageSettings
from imagic.state import EditState

from helpers import quick_settings, scene_image

TEXT = "a photo of a red dog"
ONE_STEP_EACH = dict(embedding=StageSettings(steps=1, learning_rate=5e-2), fine_tune=StageSettings(steps=1, learning_rate=2e-3))


def _train(pipe, **overrides) -> EditState:
    return ImagicEditor(pipe).train(scene_image(), TEXT, quick_settings(**overrides), progress=False)


def test_early_stop_ends_fine_tuning_on_an_easy_goal_and_the_state_records_the_step(sd1_pipe, tmp_path):
    easy = StageSettings(steps=300, learning_rate=5e-4, stop_ratio=0.8, check_every=5)
    state = _train(sd1_pipe, method="full", fine_tune=easy, embedding=StageSettings(steps=2, learning_rate=5e-2))
    ran = len(state.losses["fine_tune"])
    assert state.complete and ran < 300 and ran % 5 == 0
    assert state.stopped_early == {"fine_tune": ran}  # the embedding stage, with no goal, ran its 2 steps
    state.save(tmp_path / "state.safetensors")
    assert EditState.load(tmp_path / "state.safetensors").stopped_early == {"fine_tune": ran}


def test_early_stop_does_not_end_a_stage_whose_goal_is_out_of_reach(sd1_pipe):
    hard = dict(stop_ratio=1e-6, check_every=2)
    state = _train(sd1_pipe, embedding=StageSettings(steps=6, learning_rate=5e-2, **hard),
                   fine_tune=StageSettings(steps=6, learning_rate=2e-3, **hard))
    assert [len(state.losses[stage]) for stage in ("embedding", "fine_tune")] == [6, 6]
    assert state.complete and state.stopped_early == {}


def test_the_summary_says_where_the_reconstruction_check_stopped_training(sd1_folder, photo, tmp_path):
    out = tmp_path / "out"
    assert main(["edit", str(photo), TEXT, "--model", str(sd1_folder), "--out", str(out), "--quiet", "--method", "lora",
                 "--lora-rank", "2", "--embedding-steps", "2", "--finetune-steps", "60", "--finetune-lr", "5e-3",
                 "--finetune-stop", "0.95", "--check-every", "3", "--steps", "2", "--eta", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ran = len(summary["losses"]["fine_tune"]["per_step"])
    assert ran < 60 and summary["stopped_early"] == {"fine_tune": ran}


def test_a_state_saved_before_the_step_saving_options_loads_with_them_off(sd1_pipe, tmp_path):
    path = _train(sd1_pipe, **ONE_STEP_EACH).save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header, tensors = json.loads(handle.metadata()["imagic"]), {key: handle.get_tensor(key) for key in handle.keys()}
    del header["settings"]["compile"]
    for stage in ("embedding", "fine_tune"):
        for key in ("copies", "stop_ratio", "check_every"):
            del header["settings"][stage][key]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"imagic": json.dumps(header)})
    settings = EditState.load(old).settings
    assert not settings.compile and settings.fine_tune.stop_ratio is None and settings.embedding.copies == 1


def test_stage_1_trains_the_embedding_through_the_frozen_model_without_adapters(sd1_pipe, monkeypatch):
    seen = {}
    original = optimisation.Optimisation.__init__

    def watch(self, stage, batch, denoiser, params, *args, **kwargs):
        seen[stage] = (denoiser, params)
        original(self, stage, batch, denoiser, params, *args, **kwargs)

    monkeypatch.setattr(optimisation.Optimisation, "__init__", watch)
    _train(sd1_pipe, method="lora", **ONE_STEP_EACH)
    denoiser, params = seen["embedding"]
    assert not any(isinstance(module, LoraLayer) for module in denoiser.modules())  # LoRA joins in stage 2
    assert not any(p.requires_grad for p in denoiser.parameters()) and all(p.ndim == 3 for p in params)
    assert any(isinstance(module, LoraLayer) for module in seen["fine-tune"][0].modules())


def test_compile_trains_the_denoiser_through_torch_compile_to_the_same_losses(sd1_pipe, monkeypatch):
    monkeypatch.setattr(denoisers, "COMPILE_BACKEND", "aot_eager")  # dynamo and autograd's graphs, no C++ build
    compiled = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(kw) or original(self, **kw))
    short = dict(embedding=StageSettings(steps=2, learning_rate=5e-2), fine_tune=StageSettings(steps=2, learning_rate=2e-3))
    plain, fast = _train(sd1_pipe, **short), _train(sd1_pipe, **short, compile=True)
    assert compiled == [{"backend": "aot_eager"}] * 2  # the stage 1 view and the stage 2 copy
    assert fast.settings.compile and list(fast.weights["unet"]) == list(plain.weights["unet"])
    for stage in ("embedding", "fine_tune"):
        assert fast.losses[stage] == pytest.approx(plain.losses[stage], rel=1e-4)


def test_compile_that_cannot_run_here_is_refused_in_one_line(sd1_pipe, sd1_folder, photo, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(denoisers, "compile_failure", lambda backend: "no C++ compiler found")
    with pytest.raises(SettingsError, match=r"--compile: torch.compile \(inductor\) does not work here: no C\+\+"):
        _train(sd1_pipe, compile=True)
    assert main(["train", str(photo), TEXT, "--model", str(sd1_folder), "--state", str(tmp_path / "s.safetensors"),
                 "--quiet", "--compile"]) != 0
    error = capsys.readouterr().err.strip()
    assert "--compile" in error and len(error.splitlines()) == 1 and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("command", ["train", "batch"])
def test_the_step_saving_options_reach_the_settings_from_the_command_line(command, tmp_path):
    where = ["IMAGE", TEXT, "--state", "s.safetensors"] if command == "train" else ["FOLDER"]
    request = parse([command, *where, "--compile", "--embedding-stop", "0.5", "--finetune-stop", "0.7",
                     "--check-every", "4", "--copies", "3"])
    settings = request.train
    assert settings.compile
    assert (settings.embedding.stop_ratio, settings.fine_tune.stop_ratio) == (0.5, 0.7)
    assert settings.embedding.check_every == settings.fine_tune.check_every == 4
    assert settings.embedding.copies == settings.fine_tune.copies == 3
    plain = parse([command, *where]).train
    assert not plain.compile and plain.fine_tune.stop_ratio is None and plain.embedding.stop_ratio is None
