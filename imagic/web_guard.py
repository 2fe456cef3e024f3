"""The web app's sessions kept apart: a browser gets nothing of another browser's edit.

Gradio names a page's session by a hash the page makes up and sends with every request (the queue's events, its
message stream, its heartbeat), and serves files by their path (`/gradio_api/file=PATH`) to whoever asks: neither
is tied to a browser, so whoever learns a hash or a file's address could read that session's edit. This ASGI
middleware ties both to the browser: each browser gets a random cookie (HttpOnly); a session hash belongs to the
first browser that sends it, and a request carrying it from another browser is refused; a file under the app's
folder is served only to the browser whose session wrote it. The app keeps its sessions' files (photo, images,
edit state) in that folder and nowhere else that Gradio serves.
"""

import json
import os
import secrets
import threading
from pathlib import Path
from urllib.parse import parse_qs

COOKIE = "imagic-browser"
MAX_BODY = 8 * 2**20  # a queued event's inputs (text, numbers, file references); files are uploaded elsewhere


class Owners:
    """Which browser owns each session hash and each session folder (a folder directly under `root`)."""

    def __init__(self, root: Path):
        self.root = root
        self._hashes: dict[str, str] = {}
        self._folders: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, session_hash: str, browser: str) -> bool:
        """True where the hash is this browser's: it is bound to the first browser that sends it."""
        with self._lock:
            return self._hashes.setdefault(session_hash, browser) == browser

    def own(self, folder: Path, browser: str) -> None:
        with self._lock:
            self._folders[folder.name] = browser

    def forget(self, session_hash: str, folder: Path | None) -> None:
        with self._lock:
            self._hashes.pop(session_hash, None)
            if folder is not None:
                self._folders.pop(folder.name, None)

    def may_read(self, path: str, browser: str | None) -> bool:
        """False for a file under the root that is not in a folder of this browser's; True outside the root."""
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(self.root):
            return True
        parts = resolved.relative_to(self.root).parts
        with self._lock:
            return bool(parts) and browser is not None and self._folders.get(parts[0]) == browser


def browser_of(cookies: dict) -> str | None:
    """The browser's id from a request's cookies (a gr.Request's or a Starlette request's)."""
    return cookies.get(COOKIE) or None


class SessionGuard:
    """ASGI middleware around Gradio's app; see the module's docstring."""

    def __init__(self, app, owners: Owners):
        self.app = app
        self.owners = owners

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        browser = _cookie(scope)
        hashes, receive = await _session_hashes(scope, receive)
        if not self._allowed(scope["path"], hashes, browser):
            return await _not_found(send)
        if browser is None:
            send = _with_cookie(send, secrets.token_urlsafe(32))
        if _file_path(scope["path"]) is None:
            return await self.app(scope, receive, send)
        return await _file_or_not_found(self.app, scope, receive, send)

    def _allowed(self, path: str, hashes: list[str] | None, browser: str | None) -> bool:
        if hashes is None:
            return False
        file = _file_path(path)
        if file is not None and not self.owners.may_read(file, browser):
            return False
        return all(browser is not None and self.owners.claim(h, browser) for h in hashes)


async def _session_hashes(scope, receive) -> tuple[list[str] | None, object]:
    """The session hashes a request carries (its query, a heartbeat's path, a JSON body), None for a body too large
    to be one of Gradio's event requests; and a `receive` that replays the body read."""
    hashes = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", [])
    parts = scope["path"].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "heartbeat":
        hashes.append(parts[-1])
    if scope["method"] != "POST" or b"json" not in dict(scope["headers"]).get(b"content-type", b""):
        return hashes, receive
    body = await _read_body(receive)
    if body is None:
        return None, receive
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("session_hash"), str):
        hashes.append(data["session_hash"])
    return hashes, _replay(body, receive)


def _cookie(scope) -> str | None:
    header = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
    cookies = dict(part.strip().split("=", 1) for part in header.split(";") if "=" in part)
    return browser_of(cookies)


def _file_path(path: str) -> str | None:
    """The server path a Gradio file route asks for (`.../file=PATH` or `.../file/PATH`), else None."""
    for marker in ("/file=", "/file/"):
        if marker in path:
            return path.split(marker, 1)[1] or None
    return None


async def _file_or_not_found(app, scope, receive, send) -> None:
    """A file route's answer, or a quiet 404 where the file went between Gradio's check and its read (an upload is
    removed once read, while the page may still fetch its preview): Starlette raises there, and the server would
    log a traceback."""
    started = False

    async def sending(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, sending)
    except RuntimeError as error:
        if started or not isinstance(error.__context__, FileNotFoundError):
            raise
        await _not_found(send)


async def _read_body(receive) -> bytes | None:
    """The whole body, or None past MAX_BODY."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            return None
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_cookie(send, token: str):
    async def sending(message):
        if message["type"] == "http.response.start":
            cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax".encode("latin-1")
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return sending


async def _not_found(send) -> None:
    body = b'{"detail": "Not found"}'
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
