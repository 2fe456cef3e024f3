"""The web app, `imagic ui`: upload a photo, type the edited photo's description, train with a progress
bar and a Cancel button, then drag an eta slider and pick seeds without training again.

Gradio is an optional extra (`pip install "imagic[ui]"`). One training or sampling runs at a time
(one shared Gradio queue, which shows each waiting browser its place); each browser session has a
temporary folder of its own for its photo's state and outputs, removed when the page closes.
"""

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from .editor import ImagicEditor
from .errors import ImagicError, TrainingDivergedError, TrainingInterrupted
from .image_io import load_image, save_image, to_rgb
from .loading import defaults_before_loading
from .settings import FINE_TUNE_METHODS, SampleSettings, StageSettings, TrainSettings
from .state import EditState

MAX_UPLOAD = "32mb"  # refused by Gradio before anything is decoded; the decoder's own pixel limit comes after
DEVICE_QUEUE = "device"  # training and sampling share it: one at a time on the model's device
DISPLAY_SIDE = 256  # pixels: a 64 px edit of the built-in model is shown four times as large
STAGE_NAMES = {"embedding": "stage 1 of 2, embedding", "fine-tune": "stage 2 of 2, fine-tuning"}


@dataclass
class Session:
    """One browser session's edit: its folder, its trained state, and its Cancel flag."""

    folder: Path
    state: EditState | None = None
    saved: EditState | None = None  # the state last written to the folder
    photo: Path | None = None
    trained_on: Path | None = None  # the photo `state` was trained on here; None for an uploaded state
    cancel: threading.Event = field(default_factory=threading.Event)


class App:
    """The models, loaded once and shared, and the sessions' edits."""

    def __init__(self, models: list[str], device: str | None = None):
        self.models = models
        self.device = device
        self._editors: dict[str, ImagicEditor] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def editor(self, model: str) -> ImagicEditor:
        with self._lock:
            if model not in self._editors:
                self._editors[model] = ImagicEditor.from_pretrained(model, device=self.device)
            return self._editors[model]

    def session(self, request: gr.Request) -> Session:
        with self._lock:
            key = request.session_hash
            if key not in self._sessions:
                self._sessions[key] = Session(Path(tempfile.mkdtemp(prefix="imagic-ui-")))
            return self._sessions[key]

    def close_session(self, request: gr.Request) -> None:
        with self._lock:
            session = self._sessions.pop(request.session_hash, None)
        if session is not None:
            session.cancel.set()
            shutil.rmtree(session.folder, ignore_errors=True)


def _one_line(error: Exception | str) -> gr.Error:
    return gr.Error(" ".join(str(error).split()), print_exception=False)


def defaults_shown(model: str, method: str) -> tuple:
    """The training settings folded away, filled with the model's defaults for `method`."""
    defaults = defaults_before_loading(model)
    fine_tune = defaults.fine_tune[method]
    return defaults.embedding.steps, defaults.embedding.learning_rate, fine_tune.steps, fine_tune.learning_rate


def build(app: App) -> gr.Blocks:
    first = app.models[0]
    defaults = defaults_before_loading(first)
    with gr.Blocks(title="imagic") as page:
        gr.Markdown("# imagic\nEdit a real photo from one sentence (Imagic, Kawar et al. 2023): train on your photo "
                    "once, then sample any eta and seed.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="photo", elem_id="photo-upload", type="filepath")
                photo = gr.Image(label="your photo", interactive=False, elem_id="photo", height=256)
                text = gr.Textbox(label="the edited photo, described", elem_id="target-text",
                                  placeholder="a photo of a sitting dog")
                with gr.Row():
                    model = gr.Dropdown(app.models, value=first, label="model", elem_id="model")
                    method = gr.Radio(list(FINE_TUNE_METHODS), value=defaults.method, label="fine-tuning",
                                      elem_id="method")
                with gr.Accordion("training settings", open=False, elem_id="settings"):
                    filled = defaults_shown(first, defaults.method)
                    embedding_steps = gr.Number(filled[0], label="embedding steps", precision=0, elem_id="embedding-steps")
                    embedding_lr = gr.Number(filled[1], label="embedding learning rate", elem_id="embedding-lr")
                    finetune_steps = gr.Number(filled[2], label="fine-tuning steps", precision=0, elem_id="finetune-steps")
                    finetune_lr = gr.Number(filled[3], label="fine-tuning learning rate", elem_id="finetune-lr")
                    train_seed = gr.Number(0, label="training seed", precision=0, elem_id="train-seed")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="train")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                output = gr.Image(label="edited", interactive=False, elem_id="output", height=256, format="png")
                eta = gr.Slider(-0.5, 2.0, value=defaults.eta, step=0.05, label="eta (0: your photo, 1: the text)",
                                elem_id="eta")
                seed = gr.Number(0, label="sampling seed", precision=0, elem_id="seed")
                grid = gr.Image(label="a row of etas", interactive=False, elem_id="grid", format="png")
                downloads = gr.File(label="downloads: image, grid, edit state", file_count="multiple",
                                    interactive=False, elem_id="downloads")
                state_upload = gr.File(label="or sample a saved edit state (.safetensors)", elem_id="state-upload",
                                       type="filepath")

        def show_photo(path: str | None, request: gr.Request):
            session = app.session(request)
            if path is None:
                session.photo = None
                return None
            try:
                image = to_rgb(load_image(path))
            except ImagicError as error:  # named as the user knows it, not by the server's upload path
                raise _one_line(str(error).replace(path, Path(path).name)) from None
            session.photo = Path(path)
            return shown(image)

        def run_training(model_name, method_name, target_text, steps_1, lr_1, steps_2, lr_2, training_seed, eta_value,
                         seed_value, request: gr.Request, progress=gr.Progress()):
            session = app.session(request)
            if session.photo is None:
                raise gr.Error("upload a photo first", print_exception=False)
            try:
                settings = TrainSettings(
                    embedding=StageSettings(_whole(steps_1), lr_1),  # an emptied box (None) is refused there
                    fine_tune=StageSettings(_whole(steps_2), lr_2),
                    method=method_name, seed=_whole(training_seed))
                editor = app.editor(model_name)
                editor.check_sampling([eta_value], [_whole(seed_value)])
                totals = {"embedding": settings.embedding.steps, "fine-tune": settings.fine_tune.steps}

                def on_step(stage: str, step: int, loss: float) -> None:
                    total = totals[stage]
                    progress((step + 1) / total, desc=f"{STAGE_NAMES[stage]}: step {step + 1} of {total}, "
                                                      f"loss {loss:.4f}")

                note = "trained"
                try:
                    state = editor.train(session.photo, target_text, settings, progress=False, callback=on_step,
                                         should_stop=session.cancel.is_set)
                except (TrainingInterrupted, TrainingDivergedError) as stopped:
                    state, note = stopped.partial_state, " ".join(str(stopped).split())
                session.state, session.trained_on = state, session.photo
                image, grid_image, files = _sample(editor, session, eta_value, seed_value)
            except ImagicError as error:
                raise _one_line(error) from None
            return image, grid_image, files, f"{note}: drag eta or change the seed to sample again"

        def resample(model_name, eta_value, seed_value, request: gr.Request):
            session = app.session(request)
            if session.state is None:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                return _sample(app.editor(model_name), session, eta_value, seed_value)
            except ImagicError as error:
                raise _one_line(error) from None

        def load_state(path: str | None, model_name, eta_value, seed_value, request: gr.Request):
            session = app.session(request)
            if path is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                session.state, session.trained_on = EditState.load(path), None
                result = _sample(app.editor(model_name), session, eta_value, seed_value)
            except ImagicError as error:
                session.state = None
                raise _one_line(error) from None
            return *result, f"loaded the edit state for '{session.state.target_text}'"

        def clear_cancel(request: gr.Request) -> None:
            app.session(request).cancel.clear()

        def request_cancel(request: gr.Request):
            app.session(request).cancel.set()
            return "cancelling: training stops after this step and keeps what finished"

        # Queued (not on the device's queue): Gradio shows a queued event's error message; it shows only
        # "Error" for an event that skips the queue.
        upload.change(show_photo, upload, photo, concurrency_limit=None)
        gr.on([model.change, method.change], defaults_shown, [model, method],
              [embedding_steps, embedding_lr, finetune_steps, finetune_lr], queue=False)
        # The flag is cleared when Train is pressed, not when the training starts: a Cancel pressed while it
        # waits in the queue still counts.
        train.click(clear_cancel, None, None, queue=False).then(
            run_training, [model, method, text, embedding_steps, embedding_lr, finetune_steps, finetune_lr, train_seed,
                           eta, seed], [output, grid, downloads, status], concurrency_id=DEVICE_QUEUE,
            concurrency_limit=1)
        cancel.click(request_cancel, None, status, queue=False)
        gr.on([eta.release, seed.submit], resample, [model, eta, seed], [output, grid, downloads],
              concurrency_id=DEVICE_QUEUE, concurrency_limit=1, show_progress="minimal")
        state_upload.change(load_state, [state_upload, model, eta, seed], [output, grid, downloads, status],
                            concurrency_id=DEVICE_QUEUE, concurrency_limit=1)
        page.unload(app.close_session)
    return page


def _whole(value) -> int:
    """A whole number from a number box (Gradio gives floats); settings validation refuses the rest."""
    return int(value) if value is not None and float(value).is_integer() else value


def _sample(editor: ImagicEditor, session: Session, eta: float, seed) -> tuple[Image.Image, Image.Image, list[str]]:
    """The edit at `eta` and `seed`, a row of the model's etas around it, and the files to download."""
    state, seed = session.state, _whole(seed)
    etas = sorted({*editor.defaults.etas, 0.0, float(eta)})
    # With the photo trained on, the model's default start (the built-in model starts from the photo).
    output = editor.sample(state, etas, [seed], SampleSettings(batch_size=len(etas)), image=session.trained_on,
                           progress=False)
    image, grid_image = output.images[(float(eta), seed)], output.grid()
    names = [session.folder / f"eta{eta:g}_seed{seed}.png", session.folder / "grid.png",
             session.folder / "state.safetensors"]
    save_image(image, names[0], overwrite=True)
    save_image(grid_image, names[1], overwrite=True)
    if session.saved is not state:
        state.save(names[2], overwrite=True)
        session.saved = state
    return shown(image), grid_image, [str(n) for n in names]


def shown(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Small images enlarged for the page, pixel for pixel (nearest); the downloads keep the real size."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def launch(models: list[str], host: str = "127.0.0.1", port: int = 7860, device: str | None = None) -> None:
    """Serve the app until Ctrl-C; on 127.0.0.1 unless another host is asked for."""
    page = build(App(models, device))
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD,
                                                  show_error=True, inbrowser=False)
