"""The web app's server side: the models, loaded once and shared, and each browser session's edit.

Every session has a folder of its own under one temporary folder of the server's (`imagic-ui-*`), which is the
only place the app writes the files it shows; the folder is removed when the page closes, and the server's when
it stops. A session belongs to the browser that opened it (web_guard.py): a request from another browser gets
nothing of it.
"""

import itertools
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from .editor import ImagicEditor
from .errors import ImagicError
from .state import EditState
from .web_guard import Owners, browser_of

KEPT_RESULTS = 2  # result folders kept per session: the one shown and the one before (the browser may still load it)


class SessionRefused(ImagicError):
    """A request for a session that belongs to another browser."""


@dataclass
class Session:
    """One browser session: its folder, photo and trained edit, and what its page shows.

    `latest` numbers the sampling requests: only the latest one's result is shown (`App.is_latest`), and it is
    answered once (`answered`); `shown` is what the page shows, (edit, eta, seed, mask), so a request for it again
    samples nothing."""

    folder: Path
    browser: str
    photo: Image.Image | None = None
    mask_picture: Path | None = None  # the edit mask the user uploaded, white: edit
    state: EditState | None = None
    model: tuple[str, str | None] | None = None  # the model (and super-resolution model) `state` samples with
    edit: int = 0  # counts the edits the session has had: `shown` names one by it
    written: tuple[EditState, dict, Path] | None = None  # the state written for download, its sampling, its file
    latest: int = 0
    answered: int = 0
    shown: tuple | None = None
    results: list[Path] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # models an uploaded state brought in, beside the offered ones
    cancel: threading.Event = field(default_factory=threading.Event)
    _names: itertools.count = field(default_factory=itertools.count)

    def new_folder(self, kind: str) -> Path:
        """A fresh folder in the session's: each result gets new addresses, so a browser never shows a cached one."""
        folder = self.folder / f"{kind}-{next(self._names)}"
        folder.mkdir()
        return folder

    def set_edit(self, state: EditState, model: tuple[str, str | None]) -> None:
        """A newly trained or loaded edit, sampled with `model`."""
        self.state, self.model, self.edit = state, model, self.edit + 1

    def keep_results(self, folder: Path) -> None:
        self.results.append(folder)
        while len(self.results) > KEPT_RESULTS:
            shutil.rmtree(self.results.pop(0), ignore_errors=True)


class App:
    """The models offered (`models`, and `super_resolution` for a cascade), the editors loaded, the sessions."""

    def __init__(self, models: list[str], device: str | None = None, super_resolution: str | None = None):
        self.models = list(models)
        self.device = device
        self.super_resolution = super_resolution
        self.root = Path(tempfile.mkdtemp(prefix="imagic-ui-")).resolve()
        self.owners = Owners(self.root)
        self._editors: dict[tuple[str, str | None], ImagicEditor] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._loading = threading.Lock()

    def editor(self, model: str, super_resolution: str | None = None) -> ImagicEditor:
        """The model's editor, loaded on first use (one load at a time) and kept."""
        key = (model, super_resolution or None)
        with self._loading:
            if key not in self._editors:
                self._editors[key] = ImagicEditor.from_pretrained(model, device=self.device, super_resolution=key[1])
            return self._editors[key]

    def session(self, request: gr.Request) -> Session:
        """The request's session, made on its first request; refused to any browser but the one that made it."""
        browser = browser_of(dict(request.cookies))
        with self._lock:
            key = request.session_hash
            if browser is None or not self.owners.claim(key, browser):
                raise SessionRefused("this page's session belongs to another browser: reload the page")
            if key not in self._sessions:
                folder = self.root / secrets.token_urlsafe(16)  # unguessable, as a second lock
                folder.mkdir()
                self.owners.own(folder, browser)
                self._sessions[key] = Session(folder, browser)
            return self._sessions[key]

    def close_session(self, request: gr.Request) -> None:
        """The page closed: its training is cancelled and its folder removed."""
        with self._lock:
            session = self._sessions.pop(request.session_hash, None)
            if session is not None and session.browser != browser_of(dict(request.cookies)):
                self._sessions[request.session_hash] = session  # not this browser's to close
                return
        if session is not None:
            session.cancel.set()
            self.owners.forget(request.session_hash, session.folder)
            shutil.rmtree(session.folder, ignore_errors=True)

    def close(self) -> None:
        """The server stops: every training is cancelled and every session's files removed."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.cancel.set()
        shutil.rmtree(self.root, ignore_errors=True)

    def next_request(self, session: Session) -> int:
        """A new sampling request's number: from now on, the results of earlier ones are not shown."""
        with self._lock:
            session.latest += 1
            return session.latest

    def answer(self, session: Session, number) -> bool:
        """Whether to answer request `number` now: it is the latest, and not answered yet (a step of the page that
        failed, such as a mask picture refused, asks for no new sample)."""
        with self._lock:
            if number is None or int(number) != session.latest or session.answered == session.latest:
                return False
            session.answered = session.latest
            return True

    def is_latest(self, session: Session, number) -> bool:
        with self._lock:
            return number is not None and int(number) == session.latest
