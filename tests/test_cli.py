"""The `imagic` command end to end on the tiny SD1 folder."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from imagic.cli import main
from imagic.settings import SampleSettings, TrainSettings
from imagic.state import EditState

from helpers import scene_image, stop_during_fine_tuning

FAST = ["--embedding-steps", "4", "--finetune-steps", "4", "--method", "lora", "--lora-rank", "2",
        "--steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "photo.png"
    scene_image(48, 40).save(path)
    return path


@pytest.fixture(scope="module")
def edited(sd1_folder, photo, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit")
    code = main(["edit", str(photo), "a photo of a sitting dog", "--model", str(sd1_folder), "--out", str(out),
                 "--eta", "0.5", "0.8", "--seed", "0", "1", *FAST])
    assert code == 0
    return out


def test_edit_writes_images_grid_state_and_summary(edited):
    names = sorted(p.name for p in edited.iterdir())
    assert names == sorted(["eta0.5_seed0.png", "eta0.8_seed0.png", "eta0.5_seed1.png", "eta0.8_seed1.png",
                            "grid.png", "summary.json", "state.safetensors"])
    summary = json.loads((edited / "summary.json").read_text())
    assert summary["stages"] == {"embedding": "done", "fine_tune": "done"}
    assert len(summary["losses"]["embedding"]["per_step"]) == 4
    assert summary["peak_memory_bytes"] > 0 and summary["sampling"]["etas"] == [0.5, 0.8]
    assert set(summary["training_seconds"]) == {"encode", "embedding", "fine_tune"}


def test_sample_reuses_the_saved_state_and_matches_the_edit(edited, tmp_path):
    out = tmp_path / "again"
    assert main(["sample", str(edited / "state.safetensors"), "--eta", "0.8", "--seed", "1",
                 "--steps", "3", "--quiet", "--out", str(out)]) == 0  # the model is taken from the state
    assert (out / "eta0.8_seed1.png").read_bytes() == (edited / "eta0.8_seed1.png").read_bytes()


def test_existing_outputs_are_never_overwritten_unless_asked(edited, sd1_folder, photo, capsys):
    before = (edited / "grid.png").read_bytes()
    code = main(["edit", str(photo), "a dog", "--model", str(sd1_folder), "--out", str(edited), *FAST])
    assert code == 1 and "--overwrite" in capsys.readouterr().err
    assert (edited / "grid.png").read_bytes() == before


def test_train_then_sample_split_workflow(sd1_folder, photo, tmp_path):
    state = tmp_path / "edit.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(state), *FAST[:-3]]) == 0
    assert main(["sample", str(state), "--model", str(sd1_folder), "--eta", "0.7", "--steps", "2",
                 "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "no such model folder"),
    (["--model", "someone/some-model"], "no network"),
])
def test_model_problems_are_one_line_errors(photo, tmp_path, capsys, args, message):
    code = main(["edit", str(photo), "a dog", "--out", str(tmp_path), *args, *FAST])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_bad_image_and_empty_text_are_one_line_errors(sd1_folder, photo, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["edit", str(broken), "a dog", "--model", str(sd1_folder), "--out", str(tmp_path / "a"), *FAST]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert main(["edit", str(photo), " ", "--model", str(sd1_folder), "--out", str(tmp_path / "b"), *FAST]) == 1
    assert "target text is empty" in capsys.readouterr().err


def test_state_file_that_is_not_a_state_is_refused(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"nope")
    assert main(["sample", str(bogus), "--out", str(tmp_path / "o")]) == 1
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imagic.cli", "sample", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "no edit state file" in result.stderr


def test_guidance_rescale_out_of_range_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["edit", "missing.png", "a dog", "--guidance-rescale", "1.5"])
    assert exited.value.code == 2 and "'1.5' is not a number from 0 to 1" in capsys.readouterr().err


def test_diverging_training_exits_with_one_line_and_keeps_what_finished(sd1_folder, photo, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["edit", str(photo), "a dog", "--model", str(sd1_folder), "--out", str(out), *FAST,
                 "--embedding-lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 1 and "NaN/inf loss at step 2 of 4" in err and len(err.strip().splitlines()) == 1
    with safe_open(str(out / "state.safetensors"), framework="pt") as handle:  # its e_opt is past any bound now
        assert json.loads(handle.metadata()["imagic"])["stages"] == {"embedding": "NaN/inf loss at step 2 of 4"}
    assert not (out / "grid.png").exists()


def test_ctrl_c_during_training_stops_cleanly_and_saves_what_finished(sd1_folder, photo, tmp_path):
    state = tmp_path / "edit.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "imagic.cli", "train", str(photo), "a dog", "--model", str(sd1_folder),
         "--state", str(state), "--method", "lora", "--embedding-steps", "3", "--finetune-steps", "100000"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    rest = stop_during_fine_tuning(process)
    assert process.returncode == 130
    assert "fine-tuning interrupted at step" in rest and "Traceback" not in rest
    saved = EditState.load(state)
    assert saved.stages["embedding"] == "done" and saved.stages["fine_tune"].startswith("interrupted")


@pytest.mark.parametrize("model", [None, "/models/sd15"])
def test_options_left_out_take_the_models_defaults(model):
    from imagic.cli_options import parse
    from imagic.loading import defaults_before_loading

    argv = ["edit", "in.png", "a photo"] + (["--model", model] if model else [])
    request, defaults = parse(argv), defaults_before_loading(model)
    assert request.train.method == defaults.method and request.etas == list(defaults.etas)
    assert request.train.embedding == defaults.embedding
    assert request.train.fine_tune == defaults.fine_tune[defaults.method]
    assert request.train.lora_rank == TrainSettings().lora_rank  # a setting no model changes: the dataclass's
    assert request.sample == SampleSettings()  # the model's sampling defaults are filled in once it loads

    explicit = parse(argv + ["--method", "full", "--eta", "0.3", "--steps", "7", "--lora-rank", "8"])
    assert (explicit.train.method, explicit.etas, explicit.sample.num_inference_steps) == ("full", [0.3], 7)
    assert explicit.train.fine_tune.learning_rate == defaults.fine_tune["full"].learning_rate
    assert explicit.train.lora_rank == 8


def test_the_help_shows_the_defaults_of_the_model_it_will_load(sd1_folder, capsys):
    from imagic.loading import defaults_before_loading

    for model in ("shapes", str(sd1_folder)):
        with pytest.raises(SystemExit):
            main(["edit", "--model", model, "--help"])
        shown, defaults = " ".join(capsys.readouterr().out.split()), defaults_before_loading(model)
        assert f"stage 1 optimiser steps (default: {defaults.embedding.steps})" in shown
        assert f"inference steps (default: {defaults.num_inference_steps})" in shown
    assert defaults_before_loading("shapes").embedding.steps != defaults_before_loading(sd1_folder).embedding.steps


@pytest.mark.parametrize("argv, strength", [
    (["edit", "in.png", "a photo"], "default"),
    (["edit", "in.png", "a photo", "--invert"], 1.0),  # the inversion starts from full strength
    (["edit", "in.png", "a photo", "--strength", "0.4"], 0.4),
    (["sample", "state.safetensors"], 1.0),  # no photo: the paper's noise start
    (["sample", "state.safetensors", "--image", "in.png"], "default"),
])
def test_the_models_start_is_the_default_where_the_photo_is_at_hand(argv, strength):
    from imagic.checks import complete_sampling
    from imagic.cli_options import parse
    from imagic.families import StableDiffusionFamily
    from imagic.loading import defaults_before_loading, load_pipeline

    request, defaults = parse(argv), defaults_before_loading("shapes")
    family = StableDiffusionFamily(load_pipeline("shapes"))
    with_photo = request.command != "sample" or "image" in request.paths
    settings = complete_sampling(family, defaults, request.etas, request.seeds, request.sample, with_photo)
    assert settings.strength == (defaults.strength if strength == "default" else strength)


def test_editor_defaults_follow_the_model(sd1_pipe):
    from imagic.defaults import STABLE_DIFFUSION
    from imagic.editor import ImagicEditor
    from imagic.loading import defaults_before_loading, load_pipeline

    assert ImagicEditor(load_pipeline("shapes")).defaults == defaults_before_loading("shapes")
    assert ImagicEditor(sd1_pipe).defaults is STABLE_DIFFUSION


def test_the_web_app_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "imagic.webapp", raising=False)
    assert main(["ui"]) == 1
    assert capsys.readouterr().err.strip() == 'imagic: error: the web app needs Gradio: pip install "imagic[ui]"'
