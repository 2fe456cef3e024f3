"""The web app's files without a browser: a file removed while Gradio serves it is a quiet 404."""

import asyncio

import pytest
from starlette.responses import FileResponse

from imagic.web_guard import COOKIE, Owners, SessionGuard

pytest.importorskip("gradio", reason='the web app needs Gradio: pip install "imagic[ui]"')


def test_an_upload_removed_while_its_preview_is_served_is_a_quiet_404(tmp_path):
    upload = tmp_path / "photo.png"
    upload.write_bytes(b"a picture")
    response = FileResponse(upload)  # as Gradio's file route answers, having found the file there
    upload.unlink()  # read and removed by the upload's event meanwhile

    async def gradio(scope, receive, send):
        await response(scope, receive, send)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": f"/gradio_api/file={upload}", "query_string": b"",
             "headers": [(b"cookie", f"{COOKIE}=browser".encode())]}
    asyncio.run(SessionGuard(gradio, Owners(tmp_path / "app"))(scope, receive, send))  # raised before: a traceback
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 404
