"""`imagic ui` in a real browser: Debian's headless Chromium, driven by Playwright, against the app on 127.0.0.1."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imagic.families.qwen_image import QWEN_IMAGE_DEFAULTS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHOTO = Path(__file__).parent.parent / "examples" / "person.png"
# As root in a sandbox with no network: no sandboxing of its own, no GPU, no calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():  # scripts/setup_env.sh installs it where it can (as root, with apt-get)
    pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, qwen_folder):
    """The app offering the built-in model (first, the default) and a tiny Qwen-Image."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("ui") / "app.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "-m", "imagic.cli", "ui", "--port", str(port), "--model", "shapes",
                            "--model", str(qwen_folder)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if app.poll() is not None or time.monotonic() > deadline:
                app.kill()
                pytest.fail(f"the app did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    app.terminate()
    app.wait(30)


@pytest.fixture
def page(app_url):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url)
        yield page
        browser.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def _train_in_page(page, steps: int) -> None:
    """Upload the example, describe the edit, set both stages to `steps` and train until the page says so."""
    page.locator("#photo-upload input[type=file]").set_input_files(str(PHOTO))
    page.locator("#photo img").wait_for(timeout=30_000)
    page.locator("#target-text textarea").fill("a photo of a red person sitting")
    page.get_by_text("training settings").click()
    _set_number(page, "embedding-steps", steps)
    _set_number(page, "finetune-steps", steps)
    page.locator("#train").click()
    page.locator("#status").get_by_text("trained").wait_for(timeout=120_000)


def _output_src(page) -> str:
    return page.locator("#output img").get_attribute("src")


def test_upload_train_slide_and_cancel_in_a_browser(page, tmp_path):
    _train_in_page(page, steps=3)
    first = _output_src(page)
    assert first and page.locator("#grid img").count() == 1

    # Drag eta: the edit is sampled again from the saved state, and the image changes.
    box = page.locator("#eta input[type=range]").bounding_box()
    middle = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.6, middle)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.3, middle, steps=5)
    page.mouse.up()
    page.wait_for_function(f"document.querySelector('#output img').src !== {first!r}", timeout=60_000)
    eta = float(page.locator("#eta input[type=number]").input_value())
    listed = re.sub(r"\s+", "", page.locator("#downloads").inner_text())  # names and extensions sit apart
    assert eta < 1 and f"eta{eta:g}_seed0.png" in listed and "grid.png" in listed and "state.safetensors" in listed

    # A long second training, cancelled from the page once stage 2 runs: it stops and keeps what finished.
    _set_number(page, "finetune-steps", 5000)
    page.locator("#train").click()
    page.get_by_text(re.compile("stage 2 of 2")).first.wait_for(timeout=120_000)
    page.locator("#cancel").click()
    page.locator("#status").get_by_text(re.compile("interrupted at step")).wait_for(timeout=120_000)
    assert page.locator("#output img").count() == 1
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)


def test_a_model_of_another_family_is_picked_and_trained_in_the_page(page, qwen_folder):
    page.locator("#model input").click()
    page.get_by_role("option", name=str(qwen_folder)).click()
    _train_in_page(page, steps=2)
    assert _output_src(page) and page.locator("#grid img").count() == 1
    # Its native size, 256 px, not the built-in model's 64: each of the grid's etas is a cell of 256 px or more.
    width = page.locator("#grid img").evaluate("image => image.naturalWidth")
    assert width >= 256 * len(QWEN_IMAGE_DEFAULTS.etas), width


def test_a_saved_edit_state_is_sampled_without_training(page, tmp_path):
    from imagic.editor import ImagicEditor
    from imagic.settings import StageSettings, TrainSettings

    editor = ImagicEditor.from_pretrained("shapes", device="cpu")
    settings = TrainSettings(embedding=StageSettings(2, 1e-2), fine_tune=StageSettings(2, 2.5e-5))
    path = editor.train(str(PHOTO), "a photo of a red person sitting", settings, progress=False).save(
        tmp_path / "edit.safetensors")
    page.locator("#state-upload input[type=file]").set_input_files(str(path))
    page.locator("#status").get_by_text("loaded the edit state for 'a photo of a red person sitting'").wait_for(
        timeout=60_000)
    assert page.locator("#output img").count() == 1 and page.locator("#grid img").count() == 1


def test_another_browser_session_sees_nothing_of_an_edit(page, app_url, tmp_path):
    _train_in_page(page, steps=2)
    other = page.context.browser.new_page()  # a second session: its own edit, folder and Cancel flag
    other.goto(app_url)
    box = other.locator("#eta input[type=range]").bounding_box()
    other.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    other.locator("#seed input").fill("3")
    other.locator("#seed input").press("Enter")
    time.sleep(3)  # time for a sample to arrive, were one sent
    assert other.locator("#output img").count() == 0 and other.locator("#downloads").inner_text().count(".png") == 0
    other.locator("#train").click()  # no photo in this session, though the other has one
    other.get_by_text("upload a photo first").first.wait_for(timeout=30_000)


def test_an_upload_over_the_size_limit_is_refused_before_decoding(page, tmp_path):
    big = tmp_path / "huge.png"
    with big.open("wb") as handle:
        handle.truncate(33 * 2**20)  # over MAX_UPLOAD, and no image at all: only the size is looked at
    page.locator("#photo-upload input[type=file]").set_input_files(str(big))
    page.get_by_text(re.compile("exceed|too large|maximum", re.I)).first.wait_for(timeout=60_000)
    assert page.locator("#photo img").count() == 0


def test_a_file_that_is_not_an_image_is_a_one_line_error_in_the_page(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.locator("#photo-upload input[type=file]").set_input_files(str(bad))
    message = page.get_by_text(re.compile(r"cannot read image 'notes\.png'")).first
    message.wait_for(timeout=30_000)
    assert "Traceback" not in page.content()
