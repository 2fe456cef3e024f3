"""The editor end to end in Python: independence of edits, determinism, state files, errors."""

import signal
import threading

import pytest
import torch

from imagic import stages
from imagic.editor import ImagicEditor
from imagic.errors import SettingsError, StateMismatchError, TextInputError, TrainingDivergedError, TrainingInterrupted
from imagic.families import Text
from imagic.interrupts import stopped_by_ctrl_c
from imagic.state import EditState
from imagic.toy import build_tiny_pipeline

from helpers import pixels, quick_settings, scene_image, snapshot

SAMPLE = dict(num_inference_steps=4, progress=False)
# Python's own handler, or SIG_IGN where the tests run in the background of a shell (`cmd &`, nohup).
BEFORE = signal.getsignal(signal.SIGINT)


@pytest.fixture(scope="module")
def lora_edit(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora"), progress=False)
    return editor, state


@pytest.mark.parametrize("method", ["full", "lora"])
def test_base_model_unchanged_after_edit(sd1_pipe, method):
    before = snapshot(sd1_pipe.unet)
    flags = [p.requires_grad for p in sd1_pipe.unet.parameters()]
    modules = [type(m) for m in sd1_pipe.unet.modules()]
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings(method), progress=False)
    editor.sample(state, [0.5], [0], **SAMPLE)
    after = snapshot(sd1_pipe.unet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in sd1_pipe.unet.parameters()] == flags
    assert [type(m) for m in sd1_pipe.unet.modules()] == modules
    assert all(p.grad is None for p in sd1_pipe.unet.parameters())
    assert state.complete and state.method == method
    assert state.losses["fine_tune"] and state.losses["embedding"]


def test_two_edits_in_one_process_are_independent(sd1_pipe, lora_edit):
    editor, state = lora_edit
    first = editor.sample(state, [0.7], [3], **SAMPLE).images[(0.7, 3)]
    other = ImagicEditor(sd1_pipe)
    other.train(scene_image(seed=5), "a photo of a blue cat", quick_settings("full"), progress=False)
    again = ImagicEditor(sd1_pipe).sample(state, [0.7], [3], **SAMPLE).images[(0.7, 3)]
    assert (pixels(first) == pixels(again)).all()


def test_same_seed_gives_identical_training_and_images(sd1_pipe, lora_edit):
    _, state = lora_edit
    editor = ImagicEditor(sd1_pipe)
    retrained = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora"), progress=False)
    assert retrained.losses == state.losses
    assert all(torch.equal(retrained.weights["unet"][k], state.weights["unet"][k]) for k in state.weights["unet"])
    a = editor.sample(retrained, [0.6, 0.9], [1], **SAMPLE)
    b = editor.sample(retrained, [0.6, 0.9], [1], **SAMPLE)
    assert all((pixels(a.images[k]) == pixels(b.images[k])).all() for k in a.images)


def test_other_training_seed_gives_another_edit(sd1_pipe, lora_edit):
    _, state = lora_edit
    other = ImagicEditor(sd1_pipe).train(
        scene_image(), "a photo of a red dog", quick_settings("lora", seed=1), progress=False
    )
    assert other.losses != state.losses


@pytest.mark.parametrize("method", ["full", "lora"])
def test_saved_state_reproduces_the_images_exactly(sd1_pipe, sd1_folder, tmp_path, method):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings(method), progress=False)
    expected = editor.sample(state, [0.0, 0.7, 1.0], [0, 1], **SAMPLE)
    state.save(tmp_path / "edit.safetensors")
    loaded = EditState.load(tmp_path / "edit.safetensors")
    assert loaded.settings == state.settings and loaded.losses == state.losses
    fresh = ImagicEditor.from_pretrained(sd1_folder, device="cpu")
    got = fresh.sample(loaded, [0.0, 0.7, 1.0], [0, 1], **SAMPLE)
    assert all((pixels(expected.images[k]) == pixels(got.images[k])).all() for k in expected.images)
    assert got.grid().size[0] > 3 * state.width


def test_every_eta_of_a_seed_starts_from_the_same_noise(lora_edit):
    editor, state = lora_edit
    together = editor.sample(state, [0.2, 0.8], [4], batch_size=2, **SAMPLE)
    alone = editor.sample(state, [0.8], [4], **SAMPLE)
    diff = abs(pixels(together.images[(0.8, 4)]) - pixels(alone.images[(0.8, 4)]))
    assert diff.max() <= 1  # batched vs single maths may differ in the last bit
    assert (pixels(together.images[(0.2, 4)]) != pixels(together.images[(0.8, 4)])).any()


def test_state_from_another_model_is_refused(lora_edit, tmp_path):
    _, state = lora_edit
    other = ImagicEditor(build_tiny_pipeline("sd1", tmp_path / "tok", seed=7))
    with pytest.raises(StateMismatchError, match="different weights"):
        other.sample(state, [0.7], [0], **SAMPLE)
    sd2 = ImagicEditor(build_tiny_pipeline("sd2", tmp_path / "tok2"))
    with pytest.raises(StateMismatchError, match="architecture"):
        sd2.sample(state, [0.7], [0], **SAMPLE)


def test_training_and_sampling_size_follow_the_settings(sd1_pipe):
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(80, 60), "a dog", quick_settings("lora", resolution=(16, 24)), progress=False)
    assert (state.height, state.width) == (16, 24)
    assert editor.sample(state, [0.5], [0], **SAMPLE).images[(0.5, 0)].size == (24, 16)
    with pytest.raises(SettingsError, match="multiples of 4"):
        editor.train(scene_image(), "a dog", quick_settings("lora", resolution=30), progress=False)


def test_empty_target_text_is_refused(sd1_pipe):
    with pytest.raises(TextInputError, match="empty"):
        ImagicEditor(sd1_pipe).train(scene_image(), "   ", quick_settings(), progress=False)


def test_text_longer_than_the_window_warns_with_what_was_cut(sd1_pipe):
    long_text = "a photo of a dog " * 30 + "the end"
    with pytest.warns(UserWarning, match=r"reads 77.*cut '.*end"):
        ImagicEditor(sd1_pipe).family.encode_text(long_text)


def test_nan_loss_stops_with_a_partial_state(sd1_pipe, monkeypatch):
    editor = ImagicEditor(sd1_pipe)
    real_predict = editor.family.base.predict
    calls = {"n": 0}

    def predict_then_nan(denoiser, x_t, t, embedding, conditions=None):
        calls["n"] += 1
        out = real_predict(denoiser, x_t, t, embedding, conditions)
        return out * float("nan") if calls["n"] > 20 else out

    monkeypatch.setattr(editor.family.base, "predict", predict_then_nan)
    with pytest.raises(TrainingDivergedError, match="fine-tuning stopped: NaN/inf loss at step 6 of 15") as caught:
        editor.train(scene_image(), "a dog", quick_settings(), progress=False)
    partial = caught.value.partial_state
    assert partial.stages["embedding"] == "done" and not partial.complete
    assert len(partial.losses["fine_tune"]) == 5
    assert all(torch.isfinite(w).all() for w in partial.weights["unet"].values())
    editor.sample(partial, [0.5], [0], **SAMPLE)  # what finished can still be sampled


def test_ctrl_c_during_embedding_stops_cleanly_with_e_opt_so_far(sd1_pipe):
    def interrupt(stage, step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="embedding optimisation interrupted") as caught:
        ImagicEditor(sd1_pipe).train(scene_image(), "a dog", quick_settings(), progress=False, callback=interrupt)
    partial = caught.value.partial_state
    assert partial.method == "none" and "fine_tune" not in partial.stages
    assert len(partial.losses["embedding"]) == 4


def test_a_real_ctrl_c_inside_a_finalizer_still_stops_training(sd1_pipe):
    """SIGINT handled while a __del__ runs: a KeyboardInterrupt there would be dropped by Python."""
    class SignalsWhenCollected:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    def interrupt(stage, step, loss):
        if step == 3:
            SignalsWhenCollected()  # collected at once: the signal arrives inside __del__

    with pytest.raises(TrainingInterrupted, match="embedding optimisation interrupted") as caught:
        ImagicEditor(sd1_pipe).train(scene_image(), "a dog", quick_settings(), progress=False, callback=interrupt)
    assert len(caught.value.partial_state.losses["embedding"]) == 4
    assert signal.getsignal(signal.SIGINT) is BEFORE  # the handler from before training is back


def test_a_ctrl_c_on_the_last_embedding_step_stops_training_before_fine_tuning(sd1_pipe):
    """The stage-1 loop has no check after its last step; the Ctrl-C must still reach fine-tuning."""
    settings = quick_settings()
    last = settings.embedding.steps - 1

    def interrupt(stage, step, loss):
        if stage == "embedding" and step == last:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="fine-tuning interrupted at step 1 of") as caught:
        ImagicEditor(sd1_pipe).train(scene_image(), "a dog", settings, progress=False, callback=interrupt)
    partial = caught.value.partial_state
    assert partial.stages["embedding"] == "done" and partial.losses["fine_tune"] == []
    assert signal.getsignal(signal.SIGINT) is BEFORE


def test_should_stop_ends_training_in_a_worker_thread_and_keeps_what_finished(sd1_pipe):
    """A web front-end trains in a worker thread, where no signal handler can be set, and cancels from another."""
    editor, cancel, outcome = ImagicEditor(sd1_pipe), threading.Event(), {}

    def on_step(stage, step, loss):
        if stage == "fine-tune" and step == 2:
            cancel.set()

    def work():
        try:
            editor.train(scene_image(), "a dog", quick_settings(), progress=False, callback=on_step,
                         should_stop=cancel.is_set)
        except TrainingInterrupted as error:
            outcome["error"] = error

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(120)
    error = outcome["error"]
    assert "fine-tuning interrupted at step 4 of" in str(error)
    partial = error.partial_state
    assert partial.stages["embedding"] == "done" and len(partial.losses["fine_tune"]) == 3
    editor.sample(partial, [0.5], [0], **SAMPLE)  # what finished can still be sampled


def test_a_second_ctrl_c_interrupts_at_once():
    with stopped_by_ctrl_c() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is BEFORE


def test_ctrl_c_and_should_stop_are_one_stop_request():
    cancel = threading.Event()
    with stopped_by_ctrl_c(cancel.is_set) as stop:
        assert not stop()
        cancel.set()
        assert stop()
    with stopped_by_ctrl_c(lambda: False) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_half_precision_model_trains_with_fp32_master_weights(tmp_path, method):
    pipe = build_tiny_pipeline("sd1", tmp_path / "tok").to(torch.bfloat16)
    editor = ImagicEditor(pipe)
    seen = []
    editor.family.base.predict = _recording(editor.family.base.predict, seen)
    state = editor.train(scene_image(), "a red dog", quick_settings(method), progress=False)
    assert state.complete and set(seen) == {torch.bfloat16}  # autocast ran in the model's dtype
    assert all(w.dtype == torch.bfloat16 for w in state.weights["unet"].values())  # stored as sampled
    assert state.e_opt["prompt_embeds"].dtype == torch.float32
    assert pipe.unet.dtype == torch.bfloat16
    assert editor.sample(state, [0.7], [0], **SAMPLE).images[(0.7, 0)].size == (32, 32)


def _recording(predict, seen):
    def wrapped(denoiser, x_t, t, embedding, conditions=None):
        out = predict(denoiser, x_t, t, embedding, conditions)
        seen.append(out.dtype)
        return out

    return wrapped


def test_bad_settings_are_refused_with_the_choices():
    with pytest.raises(SettingsError, match="resize rule must be one of crop, pad, stretch"):
        quick_settings(resize="fill")
    with pytest.raises(SettingsError, match="fine-tuning method"):
        quick_settings(method="dreambooth")


def test_gradient_checkpointing_gives_the_same_training(sd1_pipe, lora_edit):
    _, state = lora_edit
    checkpointed = ImagicEditor(sd1_pipe).train(
        scene_image(), "a photo of a red dog", quick_settings("lora", gradient_checkpointing=True), progress=False
    )
    for stage, losses in state.losses.items():
        assert checkpointed.losses[stage] == pytest.approx(losses, rel=1e-4)
    assert not sd1_pipe.unet.is_gradient_checkpointing


def test_sampling_scheduler_can_be_chosen(lora_edit):
    editor, state = lora_edit
    ddim = editor.sample(state, [0.7], [0], **SAMPLE).images[(0.7, 0)]
    euler = editor.sample(state, [0.7], [0], scheduler="euler", **SAMPLE).images[(0.7, 0)]
    assert (pixels(ddim) != pixels(euler)).any()
    with pytest.raises(SettingsError, match="unknown scheduler 'nope'"):
        editor.sample(state, [0.7], [0], scheduler="nope", **SAMPLE)


def test_guidance_rescale_reaches_the_sampler_and_zero_is_off(lora_edit):
    editor, state = lora_edit
    plain = editor.sample(state, [0.7], [0], **SAMPLE).images[(0.7, 0)]
    off = editor.sample(state, [0.7], [0], guidance_rescale=0.0, **SAMPLE).images[(0.7, 0)]
    rescaled = editor.sample(state, [0.7], [0], guidance_rescale=0.7, **SAMPLE).images[(0.7, 0)]
    assert (pixels(plain) == pixels(off)).all() and (pixels(plain) != pixels(rescaled)).any()
    with pytest.raises(SettingsError, match="guidance_rescale is 1.5; give a value from 0"):
        editor.sample(state, [0.7], [0], guidance_rescale=1.5, **SAMPLE)


def _composed(editor: ImagicEditor, settings, e_opt=None):
    """Stage 1 (unless e_opt is given) and a stage 2 of the base level, composed from the stage functions."""
    photo = editor.photo(scene_image(), settings)
    e_tgt = editor.family.encode_text("a photo of a red dog")
    precision = editor.precision(settings)
    if e_opt is None:
        e_opt, _ = stages.optimize_embedding(editor.family, photo, e_tgt, settings, precision)
    return e_opt, stages.FineTuning(editor.family, editor.family.base, photo, Text(e_opt, e_tgt.extras),
                                    settings, precision)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fine_tuning_in_pieces_equals_shorter_and_longer_runs(sd1_pipe, method):
    """The benchmark samples several fine-tuning lengths of one run: a run stopped at 5 steps and taken on to 10
    gives at 5 what a 5-step training gives, and at 10 what the 10-step training gives."""
    editor = ImagicEditor(sd1_pipe)
    settings = quick_settings(method)
    _, tuning = _composed(editor, settings)
    early = tuning.run(5)
    assert early.finished and len(early.losses) == 5
    at_5 = tuning.weights()
    at_10 = (tuning.run(), tuning.weights())[1]
    short = editor.train(scene_image(), "a photo of a red dog", settings.with_fine_tune_steps(5), progress=False)
    final = editor.train(scene_image(), "a photo of a red dog", settings, progress=False)
    assert all(torch.equal(at_5[k], short.weights["unet"][k]) for k in short.weights["unet"])
    assert all(torch.equal(at_10[k], final.weights["unet"][k]) for k in final.weights["unet"])
    assert tuning.optimisation.result.losses == final.losses["fine_tune"]
    assert not all(torch.equal(at_5[k], at_10[k]) for k in at_10)


def test_one_stage_1_serves_several_stage_2s_as_fresh_runs_would(sd1_pipe, lora_edit):
    """Each stage draws from its own seeded generator: stage 1 run once and fine-tuned twice gives what two
    whole trainings give."""
    editor, first = lora_edit
    full = quick_settings("full")
    e_opt, tuning = _composed(editor, full)
    assert torch.equal(e_opt["prompt_embeds"].cpu(), first.e_opt["prompt_embeds"])  # stage 1 is the same for both
    tuning.run()
    fresh = editor.train(scene_image(), "a photo of a red dog", full, progress=False)
    weights = tuning.weights()
    assert all(torch.equal(weights[k], fresh.weights["unet"][k]) for k in fresh.weights["unet"])


def test_a_lora_merged_for_sampling_gives_the_same_images_after_training_and_after_loading(sd1_pipe, tmp_path,
                                                                                          monkeypatch):
    """Where a GPU has room, a LoRA is merged for sampling, both right after training and from a saved state."""
    from imagic import denoisers

    monkeypatch.setattr(denoisers, "worth_merging", lambda model: True)  # as on a GPU with room
    editor = ImagicEditor(sd1_pipe)
    state = editor.train(scene_image(), "a photo of a red dog", quick_settings("lora"), progress=False)
    assert not any("lora_" in name for name, _ in editor._cache.denoisers(state)["unet"].named_parameters())  # merged
    first = editor.sample(state, [0.7], [0], num_inference_steps=3, progress=False).images[(0.7, 0)]
    path = state.save(tmp_path / "state.safetensors")
    again = ImagicEditor(sd1_pipe).sample(EditState.load(path), [0.7], [0], num_inference_steps=3,
                                          progress=False).images[(0.7, 0)]
    assert first.tobytes() == again.tobytes()
