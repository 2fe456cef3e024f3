"""The web app's files without a browser: a file removed while Gradio serves it is a quiet 404, and a state downloaded
after sampling with a mask picture samples again with `imagic sample`, its mask.png beside it."""

import asyncio
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the web app needs Gradio: pip install "imagic[ui]"')

from starlette.responses import FileResponse  # noqa: E402  (Gradio's own dependency)

from imagic.cli import main  # noqa: E402
from imagic.settings import StageSettings  # noqa: E402
from imagic.web_guard import COOKIE, Owners, SessionGuard  # noqa: E402

from helpers import quick_settings, scene_image  # noqa: E402


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


def test_a_state_downloaded_after_sampling_with_a_mask_picture_samples_with_its_mask_beside_it(sd1_folder, tmp_path):
    from imagic.web_edits import read_mask, show_edit, train_edit
    from imagic.web_sessions import App, Session

    app, model = App([str(sd1_folder)]), (str(sd1_folder), None)
    try:
        session = Session(app.root / "session", "browser")
        session.folder.mkdir()
        session.photo = scene_image(32, 32)
        drawn = np.zeros((32, 32), np.uint8)
        drawn[:, :16] = 255
        upload = tmp_path / "upload" / "left.png"  # read, then removed with its folder, as Gradio's upload is
        upload.parent.mkdir()
        Image.fromarray(drawn).save(upload)
        mask = str(read_mask(session, upload, "left.png"))
        few = StageSettings(2, 1e-2)
        train_edit(app, session, model, "a photo of a red dog", quick_settings("lora", lora_rank=2, embedding=few,
                   fine_tune=few), mask, lambda *step: None)
        session.state.sampling["num_inference_steps"] = 3  # the model's 50, in short
        shown = show_edit(app.editor(*model), session, 0.9, 3, mask)
        downloads = tmp_path / "downloads"  # where the browser saves the state and the mask, side by side
        downloads.mkdir()
        for path in shown.files:
            shutil.copy(path, downloads / path.name)
    finally:
        app.close()
    out = tmp_path / "again"
    assert main(["sample", str(downloads / "state.safetensors"), "--eta", "0.9", "--seed", "3", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "eta0.9_seed3.png").read_bytes() == (downloads / "eta0.9_seed3.png").read_bytes()
    assert (out / "mask.png").read_bytes() == (downloads / "mask.png").read_bytes()
