"""What the web app's page does, apart from the page: read a photo and a mask picture, train an edit, sample what
the page shows, load a saved edit state, and the settings a model starts with. Files go into the session's folder
only."""

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image

from .editor import ImagicEditor
from .errors import ImageInputError, ImagicError, ModelLoadError, SettingsError, TrainingDivergedError, TrainingInterrupted
from .image_io import load_image, save_image, to_rgb
from .loading import check_model, defaults_before_loading
from .masks import AUTO, MASK_FILE, from_picture, read_picture
from .memory import MemorySettings
from .optimisation import StepCallback
from .settings import NO_MASK, SampleSettings, TrainSettings
from .stages import stage_label
from .state import EditState
from .web_sessions import App, Session

DISPLAY_SIDE = 256  # pixels: a 64 px edit of the built-in model is shown four times as large
PREVIEW_SIDE = 1024  # a larger photo is shown shrunk to this side; it is trained on as it is
PICTURE = "picture"  # the page's edit mask choices: NO_MASK, AUTO and this
Decoded = TypeVar("Decoded")


@dataclass
class Shown:
    """A result as the page shows it: the edit at (eta, seed), for the page and to download; a row of etas; the
    mask where one was used; every file to download."""

    view: Path
    caption: str
    grid: Path
    mask: Path | None
    files: list[Path]


@dataclass(frozen=True)
class FormDefaults:
    """The settings the page fills in for a model (and a fine-tuning method)."""

    method: str
    embedding_steps: int
    embedding_lr: float
    finetune_steps: int
    finetune_lr: float
    finetune_stop: float  # the reconstruction check's stop ratio, 0 for none (StageSettings.stop_ratio)
    eta: float
    mask: str  # NO_MASK or AUTO


def form_defaults(model: str, method: str | None = None) -> FormDefaults:
    """The model's defaults, for its own fine-tuning method unless `method` names one; read from its files."""
    defaults = defaults_before_loading(model)
    method = method or defaults.method
    fine_tune = defaults.fine_tune[method]
    return FormDefaults(method, defaults.embedding.steps, defaults.embedding.learning_rate, fine_tune.steps,
                        fine_tune.learning_rate, fine_tune.stop_ratio or 0.0, defaults.eta, defaults.mask)


def one_line(error: Exception | str) -> str:
    return " ".join(str(error).split())


def read_photo(session: Session, upload: Path, name: str) -> Path:
    """The uploaded photo, decoded as `imagic edit` decodes it and kept for training; returns a preview to show."""
    session.photo = None
    image = _decoded(upload, name, lambda path: to_rgb(load_image(path)))
    path = save_image(preview(image), session.new_folder("photo") / "photo.png")
    session.photo = image
    return path


def read_mask(session: Session, upload: Path, name: str) -> Path:
    """An uploaded mask picture (white: edit, black: keep), decoded as `--mask PICTURE` decodes it, checked against
    the shape of the session's edit where it has one (else when it trains), and kept; returns it, to show."""
    session.mask_picture = None
    picture = _decoded(upload, name, read_picture)
    if session.state is not None:
        from_picture(picture, session.state.height, session.state.width)
    session.mask_picture = save_image(picture, session.new_folder("mask") / "mask.png")
    return session.mask_picture


def _decoded(upload: Path, name: str, decode: Callable[[Path], Decoded]) -> Decoded:
    """`decode(upload)`, its one-line error naming the file as the user knows it, not by the server's upload path.
    The upload is removed either way: Gradio would serve it to whoever has its address."""
    try:
        return decode(upload)
    except ImagicError as error:
        raise ImageInputError(one_line(error).replace(str(upload), name)) from None
    finally:
        remove_upload(upload)


def mask_setting(session: Session, choice: str) -> str:
    """The SampleSettings mask that the page's choice stands for: none, auto, or the session's mask picture."""
    if choice != PICTURE:
        return AUTO if choice == AUTO else NO_MASK
    if session.mask_picture is None:
        raise SettingsError("upload a mask picture (white: edit, black: keep), or pick another edit mask")
    return str(session.mask_picture)


def remove_upload(upload: Path) -> None:
    """An uploaded file, and the folder Gradio made for it."""
    upload.unlink(missing_ok=True)
    try:
        upload.parent.rmdir()
    except OSError:
        pass  # not empty: another upload of the same bytes is in it


def train_edit(app: App, session: Session, model: tuple[str, str | None], text: str, settings: TrainSettings,
               mask: str, on_step: StepCallback, memory: MemorySettings = MemorySettings()) -> str:
    """Stages 1 and 2 on the session's photo with `model` (and its super-resolution model) and the `memory`
    levers; the edit is kept in the session, to be shown with `mask`. Returns the status line: "trained", or where
    training stopped (Cancel, a NaN loss), keeping what finished."""
    editor = app.editor(*model)
    if mask not in (NO_MASK, AUTO):  # a picture of another shape is refused before training, as `imagic edit` does
        from_picture(mask, *editor.resolution(settings))
    note = "trained"
    try:
        state = editor.train(session.photo, text, settings, progress=False, callback=on_step,
                             should_stop=session.cancel.is_set, memory=memory)
    except (TrainingInterrupted, TrainingDivergedError) as stopped:
        state, note = stopped.partial_state, one_line(stopped)
    state.sampling = {**state.sampling, "mask": mask}
    session.set_edit(state, model)
    early = [f"{stage_label(stage)} reached its goal at step {steps}" for stage, steps in state.stopped_early.items()]
    return f"{note} ({', '.join(early)})" if early else note


def show_edit(editor: ImagicEditor, session: Session, eta: float, seed: int, mask: str) -> Shown:
    """The session's edit at (eta, seed), sampled as `imagic sample STATE --eta ETA --seed SEED` samples it (as the
    state records, from the photo it carries, the pair in a batch of its own: the same bytes), beside a row of the
    model's etas sampled apart; written to a new folder with the state, which records the mask shown."""
    state = session.state
    state.sampling = {**state.sampling, "mask": mask}
    settings = SampleSettings(**state.sampling)
    output = editor.sample(state, [eta], [seed], settings, progress=False)
    etas = sorted({*editor.defaults.etas, 0.0, eta})
    row = editor.sample(state, etas, [seed], settings, progress=False)
    folder = session.new_folder("result")
    image, name = output.images[(eta, seed)], f"eta{eta:g}_seed{seed}"
    edited, grid = save_image(image, folder / f"{name}.png"), save_image(row.grid(), folder / "grid.png")
    view = edited if enlarged(image) is image else save_image(enlarged(image), folder / f"{name}_shown.png")
    mask_path = None if output.mask is None else save_image(output.mask, folder / MASK_FILE)
    session.keep_results(folder)
    files = [edited, grid, *filter(None, [mask_path]), _state_file(session)]
    masked = "" if mask == NO_MASK else ", automatic mask" if mask == AUTO else ", your mask"
    return Shown(view, f"eta {eta:g}, seed {seed}{masked}", grid, mask_path, files)


def _state_file(session: Session) -> Path:
    """The session's state written for download, again only where it or the sampling it records changed."""
    state = session.state
    written = session.written
    if written is None or written[0] is not state or written[1] != state.sampling:
        if written is not None:
            shutil.rmtree(written[2].parent, ignore_errors=True)
        recorded = state.sampling if state.sampling.get("mask") != str(session.mask_picture) else \
            {**state.sampling, "mask": MASK_FILE}  # the picture downloaded beside it, not the server's path
        path = replace(state, sampling=recorded).save(session.new_folder("state") / "state.safetensors")
        session.written = (state, dict(state.sampling), path)
    return session.written[2]


def load_state(app: App, session: Session, upload: Path, name: str) -> EditState:
    """An uploaded edit state, with the model it names (and its super-resolution model) loaded to sample it: one the
    server does not offer is added for this session, or refused in one line where it cannot be loaded. A mask
    picture it names is never read (a path on someone's machine): the page asks for the picture instead."""
    state = _decoded(upload, name, EditState.load)
    model, upscale = state.base_model.get("name") or "", state.super_resolution or None
    try:
        for name in filter(None, (model, upscale)):
            check_model(name)
        editor = app.editor(model, upscale)
    except ModelLoadError as error:
        raise ModelLoadError(f"the edit state's model cannot be loaded: {error}") from None
    editor.check_state(state)
    session.set_edit(state, (model, upscale))
    session.mask_picture = None  # an earlier edit's: this one's is asked for where it was shown with one
    if model not in app.models and model not in session.models:
        session.models.append(model)
    return state


def enlarged(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Small images enlarged for the page, pixel for pixel (nearest); the downloads keep the real size."""
    factor = max(1, side // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def preview(image: Image.Image) -> Image.Image:
    """A photo as the page shows it: a small one enlarged, a large one shrunk."""
    if max(image.size) <= PREVIEW_SIDE:
        return enlarged(image)
    shrunk = image.copy()
    shrunk.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return shrunk
