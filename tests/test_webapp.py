"""`imagic ui` in a real browser: Debian's headless Chromium, driven by Playwright, against the app on 127.0.0.1, at a
desktop's width and a phone's (each test that says `viewport` runs at both, but those marked desktop: what they test
does not depend on the page's width)."""

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagic.families.qwen_image import QWEN_IMAGE_DEFAULTS
from imagic.loading import defaults_before_loading

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).parent.parent
PHOTO = ROOT / "examples" / "person.png"
TEXT = "a photo of a red person sitting"
# As root in a sandbox with no network: no sandboxing of its own, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORTS = {"desktop": {"width": 1280, "height": 1000}, "phone": {"width": 390, "height": 844}}
SHAPES = defaults_before_loading("shapes")
MASKED = ", automatic mask"  # the built-in model samples inside the automatic edit mask by default
# Records, on every change to the page, the status line, the caption, and the progress bars and texts shown
# outside the status line (where the one progress bar belongs).
WATCH = """() => { window.watched = []; new MutationObserver(() => {
    const text = (id) => (document.getElementById(id) || {}).innerText || '';
    const outside = [...document.querySelectorAll('.progress-text, .progress-bar')]
        .filter((e) => !e.closest('#status')).length;
    window.watched.push([text('status'), text('caption'), outside]);
}).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""

if not Path(CHROMIUM).exists():  # scripts/setup_env.sh installs it where it can (as root, with apt-get)
    pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(folder: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`imagic ui ARGS` on a free port, this checkout's imagic, its temporary files in `folder`/tmp."""
    port, tmp = _free_port(), folder / "tmp"
    tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = (folder / "app.log").open("w")
    app = subprocess.Popen([sys.executable, "-m", "imagic.cli", "ui", "--port", str(port), *args], stdout=log,
                           stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return app, url
        except OSError:
            if app.poll() is not None or time.monotonic() > deadline:
                app.kill()
                pytest.fail(f"the app did not start: {(folder / 'app.log').read_text()[-2000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, qwen_folder, if_folders):
    """The app offering the built-in model (first, the default), a tiny Qwen-Image and a tiny DeepFloyd IF with its
    stage II as the super-resolution stage. Stopped, it leaves no temporary folder behind."""
    folder = tmp_path_factory.mktemp("ui")
    app, url = _serve(folder, "--model", "shapes", "--model", str(qwen_folder), "--model", str(if_folders[0]),
                      "--super-resolution", str(if_folders[1]))
    yield url
    app.terminate()
    assert app.wait(30) == 0
    assert not list((folder / "tmp").glob("imagic-ui-*"))


@pytest.fixture(scope="module")
def chromium():
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module", params=list(VIEWPORTS))
def viewport(request) -> str:
    return request.param


def _open(chromium, url: str, viewport: str):
    """A page in a browser context of its own: its own cookies, so another browser as the app sees it."""
    context = chromium.new_context(viewport=VIEWPORTS[viewport])
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url)
    return page


@pytest.fixture
def page(chromium, app_url, viewport):
    page = _open(chromium, app_url, viewport)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def edited(chromium, app_url, viewport):
    """A page that trained an edit of the example (2 steps per stage), watched from before Train was pressed."""
    page = _open(chromium, app_url, viewport)
    _describe_edit(page, steps=2)
    page.evaluate(WATCH)
    _train(page)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def cli_edit(tmp_path_factory) -> tuple[Path, Path]:
    """`imagic edit` of the example on the built-in model at eta 0.9, seed 3, run as a user runs it (a process of its
    own, as the page's server is): its state and its image."""
    out = tmp_path_factory.mktemp("cli") / "edit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "imagic.cli", "edit", str(PHOTO), TEXT, "--model", "shapes",
                    "--embedding-steps", "2", "--finetune-steps", "2", "--eta", "0.9", "--seed", "3", "--out", str(out),
                    "--quiet"], env=env, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out / "state.safetensors", out / "eta0.9_seed3.png"


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def _open_settings(page) -> None:
    if not page.locator("#embedding-steps").is_visible():
        page.locator("#settings").get_by_text("settings", exact=True).click()


def _upload_photo(page, path: Path = PHOTO) -> None:
    page.locator("#photo input[type=file]").set_input_files(str(path))
    page.locator("#photo img[src*='photo.png']").wait_for(timeout=30_000)  # read by the app, not only uploaded


def _describe_edit(page, steps: int) -> None:
    """Upload the example, describe the edit, set both stages to `steps`."""
    _upload_photo(page)
    page.locator("#target-text textarea").fill(TEXT)
    _open_settings(page)
    _set_number(page, "embedding-steps", steps)
    _set_number(page, "finetune-steps", steps)


def _train_in_page(page, steps: int) -> None:
    _describe_edit(page, steps)
    _train(page)


def _train(page) -> None:
    """Press Train and wait until the edit is trained and shown."""
    page.locator("#train").click()
    page.locator("#status").get_by_text("trained").wait_for(timeout=300_000)  # the whole suite's load slows it
    page.locator("#caption").get_by_text("seed").wait_for(timeout=120_000)


def _caption(page) -> str:
    return page.locator("#caption").inner_text().strip()


def _wait_caption(page, caption: str) -> None:
    page.locator("#caption").get_by_text(caption, exact=True).wait_for(timeout=60_000)


def _eta(page) -> float:
    return float(page.locator("#eta input[type=number]").input_value())


def _file_urls(page) -> list[str]:
    return [a.get_attribute("href") for a in page.locator("#downloads a").all()]


def _download(page, name: str) -> bytes:
    url = next(u for u in _file_urls(page) if u.endswith("/" + name))
    response = page.request.get(url)
    assert response.ok, response.status
    return response.body()


def _left_half(folder: Path) -> Path:
    """A mask picture of the built-in model's size that edits the left half and keeps the right."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    path = folder / "left.png"
    Image.fromarray(mask).save(path)
    return path


def _within(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    return (inner["x"] >= outer["x"] - slack and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack)


def test_training_shows_one_progress_bar_then_the_edit_captioned_with_its_eta_and_seed(edited, viewport):
    watched = edited.evaluate("window.watched")
    statuses = [status for status, _, _ in watched]
    assert any("stage 2 of 2" in s for s in statuses) and any("sampling" in s for s in statuses)
    first_sampling = next(i for i, s in enumerate(statuses) if "sampling" in s)
    assert all("sampling" not in s for s in statuses[:first_sampling]) and "stage 2 of 2" in " ".join(statuses[:first_sampling])
    assert max(outside for _, _, outside in watched) == 0  # no progress anywhere but by the Train button
    assert _caption(edited) == f"eta {SHAPES.eta:g}, seed 0{MASKED}" and _eta(edited) == SHAPES.eta
    assert edited.locator("img[src*='photo.png']").count() == 1  # one box to upload and see the photo
    listed = re.sub(r"\s+", "", edited.locator("#downloads").inner_text())  # names and extensions sit apart
    assert f"eta{SHAPES.eta:g}_seed0.png" in listed and "grid.png" in listed and "state.safetensors" in listed


def test_the_result_is_near_the_top_and_its_row_of_etas_is_not_cropped(edited, viewport):
    screen = VIEWPORTS[viewport]
    top = edited.locator("#output").bounding_box()["y"]
    assert -2 <= top < screen["height"] / 2, top  # on a phone, brought up from under the form
    grid, box = edited.locator("#grid img"), edited.locator("#grid").bounding_box()
    grid.scroll_into_view_if_needed()
    image = grid.bounding_box()
    natural = grid.evaluate("image => [image.naturalWidth, image.naturalHeight, getComputedStyle(image).objectFit]")
    assert _within(image, edited.locator("#grid").bounding_box()) and _within(image, {"x": 0, **screen})
    # The whole row is drawn: shrunk to fit, never cut (the first and last eta labels in view).
    assert natural[2] == "contain" or abs(image["width"] / image["height"] - natural[0] / natural[1]) < 0.02
    assert box["width"] <= screen["width"]


def test_eta_and_seed_resample_on_change_and_the_caption_says_what_is_shown(edited, viewport):
    edited.evaluate("window.watched = []")
    box = edited.locator("#eta input[type=range]").bounding_box()
    edited.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    eta = _eta(edited)
    assert eta != SHAPES.eta
    _wait_caption(edited, f"eta {eta:g}, seed 0{MASKED}")
    edited.locator("#seed input").fill("4")  # typed, no Enter
    _wait_caption(edited, f"eta {eta:g}, seed 4{MASKED}")
    listed = re.sub(r"\s+", "", edited.locator("#downloads").inner_text())
    assert f"eta{eta:g}_seed4.png" in listed
    captions = [caption for _, caption, _ in edited.evaluate("window.watched")]
    assert set(captions) <= {f"eta {e:g}, seed {s}{MASKED}" for e, s in ((SHAPES.eta, 0), (eta, 0), (eta, 4))}


def test_the_auto_mask_is_a_setting_and_its_picture_is_shown_beside_the_result(edited, viewport):
    _open_settings(edited)
    assert edited.locator("#mask input:checked").get_attribute("value") == "auto"  # the built-in model's default
    shown = _unmasked(_caption(edited))
    edited.locator("#mask").get_by_text("none", exact=True).click()
    _wait_caption(edited, shown)
    edited.locator("#mask-view").wait_for(state="hidden", timeout=60_000)
    edited.locator("#mask").get_by_text("auto", exact=True).click()
    _wait_caption(edited, f"{shown}, automatic mask")
    edited.locator("#mask-view img").wait_for(timeout=60_000)
    assert "mask.png" in re.sub(r"\s+", "", edited.locator("#downloads").inner_text())


def _unmasked(caption: str) -> str:
    """A caption without the mask it names."""
    return re.sub(r", (automatic|your) mask$", "", caption)


def test_a_mask_picture_is_checked_and_shown_as_the_mask_that_was_used(edited, tmp_path, viewport):
    _open_settings(edited)
    shown = _unmasked(_caption(edited))
    edited.locator("#mask").get_by_text("picture", exact=True).click()
    edited.locator("#status").get_by_text("upload a mask picture").wait_for(timeout=60_000)
    wide = tmp_path / "wide.png"
    Image.new("L", (64, 32), 255).save(wide)
    edited.locator("#mask-picture input[type=file]").set_input_files(str(wide))
    refusal = edited.locator("#status").get_by_text(re.compile("the mask is 64x32, not of the edit's shape 64x64"))
    refusal.wait_for(timeout=30_000)
    assert "\n" not in refusal.inner_text().strip() and edited.locator("#mask-picture img").count() == 0
    edited.locator("#mask-picture input[type=file]").set_input_files(str(_left_half(tmp_path)))
    _wait_caption(edited, f"{shown}, your mask")
    edited.locator("#mask-view img").wait_for(timeout=30_000)
    mask = np.asarray(Image.open(io.BytesIO(_download(edited, "mask.png"))))
    assert np.array_equal(mask, np.asarray(Image.open(_left_half(tmp_path))))  # as drawn: it fits the latents


def test_a_state_shown_with_a_mask_picture_asks_for_it_and_gives_back_its_image(edited, chromium, app_url, tmp_path,
                                                                               viewport):
    eta, seed = re.fullmatch(r"eta (\S+), seed (\d+), your mask", _caption(edited)).groups()
    (tmp_path / "state.safetensors").write_bytes(_download(edited, "state.safetensors"))
    image = _download(edited, f"eta{eta}_seed{seed}.png")
    other = _open(chromium, app_url, viewport)
    try:
        other.locator("#state-upload input[type=file]").set_input_files(str(tmp_path / "state.safetensors"))
        # The picture's path on the server is never read: the page asks for the picture.
        other.locator("#status").get_by_text("upload a mask picture").wait_for(timeout=60_000)
        _open_settings(other)
        assert other.locator("#mask input:checked").get_attribute("value") == "picture"
        _set_number(other, "eta", eta)
        other.locator("#seed input").fill(seed)
        other.locator("#mask-picture input[type=file]").set_input_files(str(_left_half(tmp_path)))
        _wait_caption(other, f"eta {eta}, seed {seed}, your mask")
        assert _download(other, f"eta{eta}_seed{seed}.png") == image
    finally:
        other.context.close()
    edited.locator("#mask").get_by_text("none", exact=True).click()
    _wait_caption(edited, f"eta {eta}, seed {seed}")
    assert not edited.locator("#mask-picture").is_visible() and not edited.locator("#mask-view").is_visible()


def test_another_browser_gets_nothing_of_a_session(edited, chromium, app_url, viewport):
    hashes = {m.group(1) for u in edited.requested if (m := re.search(r"session_hash=([^&]+)", u))}
    files = [*_file_urls(edited), edited.locator("#output img").get_attribute("src"),
             edited.locator("#photo img").get_attribute("src")]
    assert hashes and len(files) >= 5 and all(edited.request.get(url).ok for url in files)
    other = _open(chromium, app_url, viewport)  # another browser: its own cookies
    try:
        assert all(other.request.get(url).status == 404 for url in files)
        with pytest.raises(urllib.error.HTTPError):  # nor without any cookie
            urllib.request.urlopen(files[0])
        for session_hash in hashes:  # A's hash, sent by B: its messages, its events, its heartbeat
            assert other.request.get(f"{app_url}gradio_api/queue/data?session_hash={session_hash}").status == 404
            join = other.request.post(f"{app_url}gradio_api/queue/join", data={
                "data": [], "fn_index": 0, "session_hash": session_hash, "event_data": None, "trigger_id": None})
            assert join.status == 404
            assert other.request.get(f"{app_url}gradio_api/heartbeat/{session_hash}").status == 404
        other.locator("#seed input").fill("3")
        time.sleep(3)  # time for a sample to arrive, were one sent
        assert other.locator("#output img").count() == 0 and other.locator("#downloads a").count() == 0
        other.locator("#train").click()  # no photo in this session, though the other has one
        other.locator("#status").get_by_text("upload a photo first").wait_for(timeout=30_000)
    finally:
        other.context.close()


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_only_the_latest_request_is_shown_and_cancel_keeps_what_finished(page, viewport):
    _train_in_page(page, steps=2)
    page.evaluate(WATCH)
    _set_number(page, "finetune-steps", 5000)
    page.locator("#train").click()
    page.locator("#status").get_by_text(re.compile("stage 2 of 2")).wait_for(timeout=120_000)
    # Two requests while training holds the device: the first is overtaken, so only the second is shown.
    _set_number(page, "eta", 1.5)
    page.locator("#seed input").fill("7")
    page.locator("#cancel").click()
    page.locator("#status").get_by_text(re.compile("interrupted at step")).wait_for(timeout=120_000)
    _wait_caption(page, f"eta 1.5, seed 7{MASKED}")
    captions = [caption for _, caption, _ in page.evaluate("window.watched")]
    assert set(captions) == {f"eta {SHAPES.eta:g}, seed 0{MASKED}", f"eta 1.5, seed 7{MASKED}"}, set(captions)


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_switching_the_model_resets_the_settings_to_its_defaults(page, qwen_folder, if_folders, viewport):
    assert page.locator("#model input").get_attribute("readonly") is not None  # a fixed list: nothing typed
    _open_settings(page)
    _set_number(page, "embedding-steps", 7)
    _pick_model(page, str(qwen_folder))
    _expect_defaults(page, QWEN_IMAGE_DEFAULTS)
    assert not page.locator("#super-resolution").is_visible()
    _pick_model(page, str(if_folders[0]))
    page.locator("#super-resolution").get_by_text(str(if_folders[1])).wait_for(timeout=10_000)
    for level in ("none", str(if_folders[1])):  # the super-resolution level can be chosen, or left out
        page.locator("#super-resolution").get_by_text(level, exact=True).click()
        assert page.locator("#super-resolution input:checked").get_attribute("value") == level
    _pick_model(page, "shapes")
    _expect_defaults(page, SHAPES)
    assert not page.locator("#super-resolution").is_visible()


def _pick_model(page, name: str) -> None:
    page.locator("#model input").click()
    page.get_by_role("option", name=name).click()


def _expect_defaults(page, defaults) -> None:
    _open_settings(page)
    page.locator(f"#method input[value={defaults.method}]:checked").wait_for(timeout=10_000)
    fine_tune = defaults.fine_tune[defaults.method]
    expected = {"embedding-steps": defaults.embedding.steps, "embedding-lr": defaults.embedding.learning_rate,
                "finetune-steps": fine_tune.steps, "finetune-lr": fine_tune.learning_rate}
    for elem_id, value in expected.items():
        assert float(page.locator(f"#{elem_id} input").input_value()) == pytest.approx(value), elem_id
    assert _eta(page) == pytest.approx(defaults.eta)


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_a_state_saved_by_imagic_edit_gives_back_its_image_in_the_page(page, cli_edit, qwen_folder, viewport):
    state, image = cli_edit
    _pick_model(page, str(qwen_folder))
    _expect_defaults(page, QWEN_IMAGE_DEFAULTS)
    page.locator("#state-upload input[type=file]").set_input_files(str(state))
    page.locator("#status").get_by_text(f"loaded the edit state for '{TEXT}'").wait_for(timeout=60_000)
    assert page.locator("#model input").input_value() == "shapes"  # the state's model, with its defaults
    _expect_defaults(page, SHAPES)
    _wait_caption(page, f"eta {SHAPES.eta:g}, seed 0{MASKED}")
    _set_number(page, "eta", 0.9)
    page.locator("#seed input").fill("3")
    _wait_caption(page, f"eta 0.9, seed 3{MASKED}")
    downloaded = np.asarray(Image.open(io.BytesIO(_download(page, "eta0.9_seed3.png"))))
    assert np.array_equal(downloaded, np.asarray(Image.open(image)))


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_a_state_of_a_model_not_offered_adds_it_or_is_refused_in_one_line(page, sd1_folder, tmp_path, viewport):
    from imagic.editor import ImagicEditor
    from imagic.settings import StageSettings, TrainSettings

    model = tmp_path / "sd1"
    shutil.copytree(sd1_folder, model)
    settings = TrainSettings(embedding=StageSettings(1, 1e-3), fine_tune=StageSettings(1, 1e-4), method="lora")
    state = ImagicEditor.from_pretrained(str(model), device="cpu").train(str(PHOTO), TEXT, settings, progress=False)
    state.sampling = {**state.sampling, "num_inference_steps": 2}
    path = state.save(tmp_path / "edit.safetensors")
    page.locator("#state-upload input[type=file]").set_input_files(str(path))
    page.locator("#status").get_by_text(f"loaded the edit state for '{TEXT}'").wait_for(timeout=60_000)
    assert page.locator("#model input").input_value() == str(model)
    page.locator("#caption").get_by_text("seed 0").wait_for(timeout=60_000)
    shutil.rmtree(model)  # now the state names a model that cannot be loaded
    page.locator("#state-upload input[type=file]").set_input_files(str(path))
    refusal = page.locator("#status").get_by_text("the edit state's model cannot be loaded")
    refusal.wait_for(timeout=60_000)
    assert "\n" not in refusal.inner_text().strip()


def test_a_file_that_is_not_an_image_is_one_line_and_leaves_no_trace(page, tmp_path, viewport):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.locator("#photo input[type=file]").set_input_files(str(bad))
    page.locator("#status").get_by_text(re.compile(r"cannot read image 'notes\.png'")).wait_for(timeout=30_000)
    assert "Traceback" not in page.content() and "\n" not in page.locator("#status").inner_text().strip()
    page.locator("#photo img").wait_for(state="detached", timeout=10_000)  # not left in the box
    _upload_photo(page)  # the message goes, and no error badge stays behind
    page.locator("#status").get_by_text("cannot read image").wait_for(state="detached", timeout=10_000)
    assert page.locator("[data-testid=status-tracker] .error").count() == 0


def test_an_upload_over_the_size_limit_is_refused_before_decoding(page, tmp_path, viewport):
    big = tmp_path / "huge.png"
    with big.open("wb") as handle:
        handle.truncate(33 * 2**20)  # over MAX_UPLOAD, and no image at all: only the size is looked at
    page.locator("#photo input[type=file]").set_input_files(str(big))
    page.get_by_text(re.compile("exceed|too large|maximum", re.I)).first.wait_for(timeout=60_000)
    assert page.locator("#photo img").count() == 0


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_a_model_of_another_family_is_picked_and_trained_in_the_page(page, qwen_folder, viewport):
    _pick_model(page, str(qwen_folder))
    _train_in_page(page, steps=2)
    assert page.locator("#output img").count() == 1 and page.locator("#grid img").count() == 1
    # Its native size, 256 px, not the built-in model's 64: each of the grid's etas is a cell of 256 px or more.
    width = page.locator("#grid img").evaluate("image => image.naturalWidth")
    assert width >= 256 * len(QWEN_IMAGE_DEFAULTS.etas), width


def test_the_early_stop_is_a_setting_and_the_status_says_where_fine_tuning_reached_its_goal(page, viewport):
    _describe_edit(page, steps=2)
    _set_number(page, "finetune-steps", 400)
    _set_number(page, "finetune-lr", 1e-3)  # far above the model's 2.5e-5: the goal is near
    _set_number(page, "finetune-stop", 0.9)
    page.locator("#train").click()
    status = page.locator("#status").get_by_text(re.compile(r"fine-tuning reached its goal at step \d+"))
    status.wait_for(timeout=240_000)
    step = int(re.search(r"at step (\d+)", status.inner_text()).group(1))
    assert 0 < step < 400 and step % 10 == 0  # checked every 10 steps
    page.locator("#caption").get_by_text("seed").wait_for(timeout=120_000)  # and the edit is shown


@pytest.mark.parametrize("viewport", ["desktop"], indirect=True)
def test_the_memory_levers_are_settings_and_a_budget_reaches_the_training(page, viewport):
    _describe_edit(page, steps=2)
    assert page.locator("#offload-encoders input[type=checkbox]").count() == 1
    assert page.locator("#quantize-base").get_by_text("int8").count() == 1
    page.locator("#max-memory textarea").fill("1KiB")
    page.locator("#train").click()
    page.locator("#status").get_by_text("max memory 0.0 MiB: this full fine-tuning needs about").wait_for(timeout=120_000)


def test_sigterm_stops_the_server_and_removes_every_session_folder(chromium, tmp_path):
    app, url = _serve(tmp_path, "--model", "shapes")
    try:
        page = _open(chromium, url, "phone")
        _upload_photo(page)
        folders = list((tmp_path / "tmp").glob("imagic-ui-*"))
        assert folders and any(folders[0].rglob("photo.png"))
        page.context.close()
        app.send_signal(signal.SIGTERM)
        assert app.wait(30) == 0
    finally:
        app.kill()
    assert not list((tmp_path / "tmp").glob("imagic-ui-*"))


def test_a_missing_model_is_one_line_before_the_server_starts(tmp_path, capsys):
    from imagic.cli import main

    missing = tmp_path / "nonexistent"
    run = subprocess.run([sys.executable, "-m", "imagic.cli", "ui", "--model", str(missing), "--port", str(_free_port())],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and "Running on" not in run.stdout
    assert run.stderr.strip() == f"imagic: error: no such model folder or file: '{missing}'"
    assert main(["ui", "--super-resolution", str(missing), "--port", str(_free_port())]) == 1  # checked the same way
    assert capsys.readouterr().err.strip() == f"imagic: error: no such model folder or file: '{missing}'"


def test_ui_takes_a_super_resolution_stage():
    from imagic.cli_options import parse

    request = parse(["ui", "--model", "DeepFloyd/IF-I-XL-v1.0", "--super-resolution", "DeepFloyd/IF-II-L-v1.0"])
    assert request.options["super_resolution"] == "DeepFloyd/IF-II-L-v1.0"
