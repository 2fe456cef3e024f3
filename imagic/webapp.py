"""The web app, `imagic ui`: upload a photo, type the edited photo's description, train with a progress bar and a
Cancel button, then drag an eta slider and pick seeds without training again.

Gradio is an optional extra (`pip install "imagic[ui]"`). One training or sampling runs at a time (one shared
Gradio queue, which shows each waiting browser its place). The page always says what it shows: the image is
captioned with its eta and seed, and only the latest request's result is shown (a request overtaken while it
waited or sampled is dropped). The work is in web_edits.py, the sessions in web_sessions.py, and what keeps
sessions apart in web_guard.py.
"""

import atexit
import signal
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from .errors import ImageInputError, ImagicError
from .loading import check_model, is_cascade
from .masks import AUTO
from .memory import QUANTIZE_CHOICES, MemorySettings
from .settings import FINE_TUNE_METHODS, StageSettings, TrainSettings
from .web_edits import (
    NO_MASK,
    PICTURE,
    form_defaults,
    load_state,
    mask_setting,
    one_line,
    read_mask,
    read_photo,
    show_edit,
    train_edit,
)
from .web_guard import SessionGuard
from .web_sessions import App

MAX_UPLOAD = "32mb"  # refused by Gradio before anything is decoded; the decoder's own pixel limit comes after
DEVICE_QUEUE = "device"  # training and sampling share it: one at a time on the model's device
STAGE_NAMES = {"embedding": "stage 1 of 2, embedding", "fine-tune": "stage 2 of 2, fine-tuning"}
NO_UPSCALE = "none"
# Once a result exists, it is brought up where it is below the first half of the screen (on a phone, under the form).
SCROLL_TO_RESULT = """() => { const result = document.getElementById('output');
  const top = result ? result.getBoundingClientRect().top : 0;
  if (top < 0 || top > window.innerHeight / 2) result.scrollIntoView({block: 'start'}); }"""
CSS = """#grid img, #output img, #mask-view img, #mask-picture img { max-width: 100%; object-fit: contain; }
#status { min-height: 3em; }"""


@dataclass
class Page:
    """The page's components, by what they are for."""

    photo: gr.Image
    text: gr.Textbox
    model: gr.Dropdown
    upscale: gr.Radio
    method: gr.Radio
    embedding_steps: gr.Number
    embedding_lr: gr.Number
    finetune_steps: gr.Number
    finetune_lr: gr.Number
    finetune_stop: gr.Number
    train_seed: gr.Number
    offload_encoders: gr.Checkbox
    quantize_base: gr.Radio
    max_memory: gr.Textbox
    mask: gr.Radio
    mask_picture: gr.Image
    train: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    output: gr.Image
    mask_view: gr.Image
    caption: gr.Markdown
    eta: gr.Slider
    seed: gr.Number
    grid: gr.Image
    downloads: gr.File
    state_upload: gr.File
    ticket: gr.Number

    @property
    def defaults(self) -> list:
        """What a model's defaults fill in (form_defaults' order), with the mask and the super-resolution choice."""
        return [self.method, self.embedding_steps, self.embedding_lr, self.finetune_steps, self.finetune_lr,
                self.finetune_stop, self.eta, self.mask, self.upscale]

    @property
    def shown(self) -> list:
        return [self.output, self.mask_view, self.caption, self.grid, self.downloads, self.status]


def _form(app: App) -> dict:
    """The left column: the photo (one box to upload and see it), the text, the model and its settings, Train."""
    first = app.models[0]
    filled = form_defaults(first)
    photo = gr.Image(label="your photo", sources=["upload"], type="filepath", elem_id="photo", height=256,
                     buttons=[])
    text = gr.Textbox(label="the edited photo, described", elem_id="target-text", placeholder="a photo of a sitting dog")
    with gr.Row():
        # A fixed list, the models the server was started with (and those an uploaded edit state names).
        model = gr.Dropdown(app.models, value=first, label="model", elem_id="model", filterable=False)
        method = gr.Radio(list(FINE_TUNE_METHODS), value=filled.method, label="fine-tuning", elem_id="method")
    upscale = gr.Radio([NO_UPSCALE, *filter(None, [app.super_resolution])], value=app.super_resolution or NO_UPSCALE,
                       label="super-resolution stage (DeepFloyd IF's stage II)", elem_id="super-resolution",
                       visible=_offers_upscale(app, first))
    with gr.Accordion("settings", open=False, elem_id="settings"):
        embedding_steps = gr.Number(filled.embedding_steps, label="embedding steps", precision=0,
                                    elem_id="embedding-steps")
        embedding_lr = gr.Number(filled.embedding_lr, label="embedding learning rate", elem_id="embedding-lr")
        finetune_steps = gr.Number(filled.finetune_steps, label="fine-tuning steps", precision=0,
                                   elem_id="finetune-steps")
        finetune_lr = gr.Number(filled.finetune_lr, label="fine-tuning learning rate", elem_id="finetune-lr")
        finetune_stop = gr.Number(filled.finetune_stop, label="stop fine-tuning early once its reconstruction loss is "
                                  "down to this share of where it began (0: run every step)", minimum=0,
                                  elem_id="finetune-stop")
        train_seed = gr.Number(0, label="training seed", precision=0, elem_id="train-seed")
        offload_encoders = gr.Checkbox(False, label="text encoders and VAE out of memory while training",
                                       elem_id="offload-encoders")
        quantize_base = gr.Radio(list(QUANTIZE_CHOICES), value="none", label="LoRA over a quantized base",
                                 elem_id="quantize-base")
        max_memory = gr.Textbox("", label="max memory, e.g. 24GiB: picks the levers that fit", elem_id="max-memory")
        mask = gr.Radio([NO_MASK, AUTO, PICTURE], value=filled.mask, label="edit mask: keep the photo outside where "
                        "the edit changes it (auto) or outside your picture's white", elem_id="mask")
        mask_picture = gr.Image(label="mask picture (white: edit, black: keep; the photo's shape)", sources=["upload"],
                                type="filepath", elem_id="mask-picture", height=128, buttons=[], visible=False)
    with gr.Row():
        train = gr.Button("Train", variant="primary", elem_id="train")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
    status = gr.Markdown(elem_id="status")
    return dict(photo=photo, text=text, model=model, upscale=upscale, method=method, embedding_steps=embedding_steps,
                embedding_lr=embedding_lr, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
                finetune_stop=finetune_stop, train_seed=train_seed, offload_encoders=offload_encoders,
                quantize_base=quantize_base, max_memory=max_memory, mask=mask, mask_picture=mask_picture, train=train,
                cancel=cancel, status=status)


def _result(app: App) -> dict:
    """The right column (under the form on a phone): the edit and its caption, eta and seed, the mask, a row of
    etas, the downloads, and a saved edit state to upload."""
    with gr.Row():
        output = gr.Image(label="edited", interactive=False, elem_id="output", height=256, buttons=[])
        mask_view = gr.Image(label="edit mask", interactive=False, elem_id="mask-view", height=256, visible=False,
                             buttons=[])
    caption = gr.Markdown(elem_id="caption")
    eta = gr.Slider(-0.5, 2.0, value=form_defaults(app.models[0]).eta, step=0.05,
                    label="eta (0: your photo, 1: the text)", elem_id="eta")
    seed = gr.Number(0, label="sampling seed", precision=0, elem_id="seed")
    grid = gr.Image(label="a row of etas", interactive=False, elem_id="grid", buttons=[])
    downloads = gr.File(label="downloads: image, grid, edit state", file_count="multiple", interactive=False,
                        elem_id="downloads")
    state_upload = gr.File(label="or sample a saved edit state (.safetensors)", elem_id="state-upload",
                           type="filepath")
    ticket = gr.Number(visible=False)  # the number of the sampling request the page asks for (App.next_request)
    return dict(output=output, mask_view=mask_view, caption=caption, eta=eta, seed=seed, grid=grid,
                downloads=downloads, state_upload=state_upload, ticket=ticket)


def build(app: App) -> gr.Blocks:
    with gr.Blocks(title="imagic") as blocks:
        gr.Markdown("# imagic\nEdit a real photo from one sentence (Imagic, Kawar et al. 2023): train on your photo "
                    "once, then sample any eta and seed.")
        with gr.Row():
            with gr.Column():
                form = _form(app)
            with gr.Column():
                result = _result(app)
        page = Page(**form, **result)
        _wire(Actions(app, page), page)
        blocks.unload(app.close_session)
    return blocks


def _wire(act: "Actions", page: Page) -> None:
    """The page's events. Training and sampling share one queue (one at a time on the device) and one progress
    bar, the status line by the Train button. Every result goes through `show` after `request_sample`, so only the
    latest request's result is shown."""
    device = dict(concurrency_id=DEVICE_QUEUE, concurrency_limit=1, show_progress_on=[page.status])
    sampling = [page.ticket, page.eta, page.seed, page.mask]

    def then_show(event, scroll: bool = False) -> None:
        shown = event.then(act.show, sampling, page.shown, trigger_mode="always_last", **device)
        if scroll:
            shown.then(None, js=SCROLL_TO_RESULT)

    # Queued (not on the device's queue) so that Gradio keeps it off the page's first requests; preprocess=False:
    # the upload is decoded by imagic's own reader (its pixel limit, its one-line errors), not by Gradio's.
    page.photo.upload(act.photo_uploaded, page.photo, [page.photo, page.status], preprocess=False,
                      concurrency_limit=None, show_progress_on=[page.photo])
    page.photo.clear(act.photo_cleared, None, None, queue=False)
    page.mask.change(act.mask_picked, page.mask, page.mask_picture, queue=False)
    mask_read = page.mask_picture.upload(act.mask_uploaded, page.mask_picture,
                                         [page.mask_picture, page.status, page.ticket], preprocess=False,
                                         concurrency_limit=None, show_progress_on=[page.mask_picture])
    page.mask_picture.clear(act.mask_cleared, None, None, queue=False)
    page.model.input(act.model_picked, page.model, page.defaults, queue=False)
    page.method.input(act.method_picked, [page.model, page.method], page.defaults[1:6], queue=False)
    # The Cancel flag is cleared when Train is pressed, not when training starts: a Cancel pressed while it waits
    # in the queue still counts.
    training = page.train.click(act.begin_training, None, None, queue=False).then(
        act.train, {page.model, page.upscale, page.method, page.text, page.embedding_steps, page.embedding_lr,
                    page.finetune_steps, page.finetune_lr, page.finetune_stop, page.train_seed, page.offload_encoders,
                    page.quantize_base, page.max_memory, page.mask, page.eta, page.seed},
        page.status, **device).then(act.request_sample, None, page.ticket, queue=False)
    then_show(training, scroll=True)
    page.cancel.click(act.cancel, None, None, queue=False)
    then_show(gr.on([page.eta.change, page.seed.change, page.mask.change], act.request_sample, None, page.ticket,
                    queue=False, trigger_mode="multiple"))
    then_show(mask_read)
    loading = page.state_upload.upload(act.state_uploaded, page.state_upload,
                                       [page.state_upload, page.model, *page.defaults, page.mask_picture, page.status],
                                       preprocess=False, **device)
    then_show(loading.then(act.request_sample, None, page.ticket, queue=False), scroll=True)


class Actions:
    """What the page's events do, for one app and page: each takes the components' values and the request, and
    gives the components' new values (none where nothing changes); a user's mistake is one line in the status."""

    def __init__(self, app: App, page: Page):
        self.app, self.page = app, page
        self.nothing = {page.status: gr.skip()}  # no change (Gradio takes an empty dict for one output's value)

    def photo_uploaded(self, upload: dict | None, request: gr.Request) -> dict:
        return self._read_upload(upload, request, self.page.photo, read_photo)

    def photo_cleared(self, request: gr.Request) -> None:
        self.app.session(request).photo = None

    def mask_picked(self, choice: str) -> gr.Image:
        return gr.Image(visible=choice == PICTURE)

    def mask_uploaded(self, upload: dict | None, request: gr.Request) -> dict:
        """A mask picture read (and a sample asked for with it), or refused in one line (and nothing sampled)."""
        read = self._read_upload(upload, request, self.page.mask_picture, read_mask)
        if self.app.session(request).mask_picture is None:
            return read
        return {**read, self.page.ticket: self.request_sample(request)}

    def mask_cleared(self, request: gr.Request) -> None:
        self.app.session(request).mask_picture = None

    def _read_upload(self, upload: dict | None, request: gr.Request, box: gr.Image, read) -> dict:
        """An image uploaded to `box`, read into the session by `read`: shown as read, or emptied with one line."""
        if not upload:
            return self.nothing
        try:
            view = read(self.app.session(request), _uploaded(upload), _upload_name(upload))
        except ImagicError as error:
            return {box: None, self.page.status: one_line(error)}
        return {box: str(view), self.page.status: ""}

    def model_picked(self, model: str) -> list:
        """A model's defaults: its method, steps, learning rates, early stop, eta and mask; its super-resolution
        stage."""
        filled = form_defaults(model)
        return [filled.method, filled.embedding_steps, filled.embedding_lr, filled.finetune_steps, filled.finetune_lr,
                filled.finetune_stop, filled.eta, filled.mask, gr.Radio(visible=_offers_upscale(self.app, model))]

    def method_picked(self, model: str, method: str) -> list:
        filled = form_defaults(model, method)
        return [filled.embedding_steps, filled.embedding_lr, filled.finetune_steps, filled.finetune_lr,
                filled.finetune_stop]

    def begin_training(self, request: gr.Request) -> None:
        self.app.session(request).cancel.clear()

    def cancel(self, request: gr.Request) -> None:
        """Training stops after its current step; its own status line says where (a line written here could arrive
        after that one and hide it)."""
        self.app.session(request).cancel.set()

    def train(self, values: dict, request: gr.Request, progress=gr.Progress()) -> str:
        page, session = self.page, self.app.session(request)
        if session.photo is None:
            return "upload a photo first"
        model = values[page.model]
        upscale = values[page.upscale] if _offers_upscale(self.app, model) and values[page.upscale] != NO_UPSCALE else None
        try:
            if model not in (*self.app.models, *session.models):
                raise ImagicError(f"'{model}' is not one of the models offered: pick one from the list")
            if upscale not in (None, self.app.super_resolution, session.model and session.model[1]):
                raise ImagicError(f"'{upscale}' is not a super-resolution stage offered: pick one from the list")
            settings = TrainSettings(
                embedding=StageSettings(_whole(values[page.embedding_steps]), values[page.embedding_lr]),
                fine_tune=StageSettings(_whole(values[page.finetune_steps]), values[page.finetune_lr],
                                        stop_ratio=values[page.finetune_stop] or None),
                method=values[page.method], seed=_whole(values[page.train_seed]))  # an emptied box is refused there
            memory = MemorySettings(values[page.offload_encoders], values[page.quantize_base],
                                    values[page.max_memory].strip() or None)
            self.app.editor(model, upscale).check_sampling([values[page.eta]], [_whole(values[page.seed])])
            totals = {"embedding": settings.embedding.steps, "fine-tune": settings.fine_tune.steps}

            def on_step(stage: str, step: int, loss: float) -> None:
                total = totals[stage]
                progress((step + 1) / total, desc=f"{STAGE_NAMES[stage]}: step {step + 1} of {total}, loss {loss:.4f}")

            note = train_edit(self.app, session, (model, upscale), values[page.text], settings,
                              mask_setting(session, values[page.mask]), on_step, memory)
        except ImagicError as error:
            return one_line(error)
        return f"{note}: drag eta or change the seed to sample again"

    def request_sample(self, request: gr.Request) -> int:
        return self.app.next_request(self.app.session(request))

    def show(self, ticket, eta, seed, mask_choice, request: gr.Request, progress=gr.Progress()) -> dict:
        """The session's edit at (eta, seed) with the mask chosen, if this is still the latest request once it is
        sampled."""
        session, page = self.app.session(request), self.page
        if session.state is None or not self.app.answer(session, ticket):
            return self.nothing
        try:
            wanted = (session.edit, eta, _whole(seed), mask_setting(session, mask_choice))
            if wanted == session.shown:
                return self.nothing
            progress(0, desc=f"sampling eta {eta:g}, seed {_whole(seed)}")
            shown = show_edit(self.app.editor(*session.model), session, float(eta), *wanted[2:])
        except ImagicError as error:
            return {page.status: one_line(error)} if self.app.is_latest(session, ticket) else self.nothing
        if not self.app.is_latest(session, ticket):
            return self.nothing  # overtaken while it sampled: the later request shows its own
        session.shown = wanted
        return {page.output: str(shown.view), page.caption: shown.caption, page.grid: str(shown.grid),
                page.mask_view: gr.Image(value=None if shown.mask is None else str(shown.mask),
                                         visible=shown.mask is not None),
                page.downloads: [str(path) for path in shown.files]}

    def state_uploaded(self, upload: dict | None, request: gr.Request) -> dict:
        """A saved edit state: its model picked (offered here if it was not) with its defaults, its mask."""
        page, session = self.page, self.app.session(request)
        if not upload:
            return self.nothing
        try:
            state = load_state(self.app, session, _uploaded(upload), _upload_name(upload))
        except ImagicError as error:
            return {page.state_upload: None, page.status: one_line(error)}
        model, mask = session.model[0], state.sampling.get("mask")
        filled = dict(zip(page.defaults, self.model_picked(model)))
        filled[page.mask] = AUTO if mask == AUTO else NO_MASK if mask in (None, NO_MASK) else PICTURE
        if session.model[1]:
            filled[page.upscale] = gr.Radio(value=session.model[1], visible=True,
                                            choices=[NO_UPSCALE, session.model[1]])
        offered = gr.Dropdown(choices=[*self.app.models, *session.models], value=model)
        return {**filled, page.state_upload: None, page.mask_picture: None, page.model: offered,
                page.status: f"loaded the edit state for '{state.target_text}'"}


def _uploaded(upload: dict) -> Path:
    """The server path of a file the page uploaded, which must be in Gradio's upload folder: a page can name any
    path, and with preprocess=False Gradio does not check it."""
    path = Path(upload.get("path") or "").resolve()
    if not path.is_file() or not path.is_relative_to(Path(get_upload_folder()).resolve()):
        raise ImageInputError("that upload is gone: upload the file again")
    return path


def _upload_name(upload: dict) -> str:
    """The file's name on the user's machine, to name it in messages."""
    return upload.get("orig_name") or Path(upload["path"]).name


def _offers_upscale(app: App, model: str) -> bool:
    return app.super_resolution is not None and is_cascade(model)


def _whole(value) -> int:
    """A whole number from a number box (Gradio gives floats); settings validation refuses the rest."""
    return int(value) if value is not None and float(value).is_integer() else value


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: Gradio closes the server, and launch() removes the sessions' files


def launch(models: list[str], host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
           super_resolution: str | None = None) -> None:
    """Serve the app until Ctrl-C or SIGTERM; on 127.0.0.1 unless another host is asked for. Every model offered is
    checked first (one line for one that is missing); the sessions' files are removed however the server stops."""
    for model in [*models, *filter(None, [super_resolution])]:
        check_model(model)
    app = App(models, device, super_resolution)
    atexit.register(app.close)
    gr.set_static_paths([app.root])  # served in place, not copied into Gradio's cache: SessionGuard checks who asks
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        build(app).queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, max_file_size=MAX_UPLOAD, inbrowser=False, run_history=False,
            css=CSS, app_kwargs={"middleware": [Middleware(SessionGuard, owners=app.owners)]})
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
