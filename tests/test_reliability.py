"""Hostile but fair use through the CLI: bad settings, tampered state files and model folders, two runs
into one folder, broken images in a batch. Each must end in one line on stderr and exit code 1 (or a
correct result), leave no file it should not, and stay within bounded memory."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from imagic.batch import EditPair
from imagic.cli import main
from imagic.errors import ImageInputError
from imagic.image_io import load_image
from imagic.outputs import LOCK_NAME, write_atomic
from imagic.state import EditState

from helpers import scene_image

TRAIN = ["--embedding-steps", "2", "--finetune-steps", "2", "--method", "lora", "--lora-rank", "2", "--quiet"]
SAMPLE = ["--steps", "2"]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys_or_fd, *words: str) -> str:
    err = capsys_or_fd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def state_file(sd1_folder, photo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("state") / "edit.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(path), *TRAIN]) == 0
    return path


@pytest.mark.parametrize("options, words", [
    (["--seed", str(2**64)], ["seed", "18,446,744,073,709,551,615"]),
    (["--train-seed", "-1"], ["training seed"]),
    (["--eta", "nan"], ["eta", "finite"]),
    (["--guidance-scale", "inf"], ["guidance scale"]),
    (["--embedding-lr", "nan"], ["embedding learning rate"]),
    (["--steps", "0"], ["inference steps"]),
    (["--batch-size", "0"], ["batch size"]),
    (["--lora-rank", "1000000"], ["LoRA rank"]),
    (["--resolution", "100000"], ["resolution"]),
    (["--resolution", "256"], ["resolution", "native"]),  # the model's bound: 4x its 32 px
    (["--scheduler", "UNet2DConditionModel"], ["unknown scheduler"]),
    (["--scheduler", "ddim", "--steps", "5000"], ["5000 inference steps"]),
])
def test_bad_settings_are_one_line_before_any_work(sd1_folder, photo, tmp_path, capsys, options, words):
    out = tmp_path / "out"
    assert main(["edit", str(photo), "a dog", "--model", str(sd1_folder), "--out", str(out), *TRAIN, *SAMPLE,
                 *options]) == 1
    one_line(capsys, *words)
    assert not out.exists()  # no state file, not even an empty folder


def test_out_that_is_a_file_a_read_only_place_or_a_name_too_long_is_one_line(photo, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    for out, words in ((a_file, ["is a file"]), (Path("/proc/imagic-out"), ["cannot"]),
                       (tmp_path / ("x" * 300), ["longer than the file system allows"])):
        assert main(["edit", str(photo), "a dog", "--out", str(out), *TRAIN]) == 1
        one_line(capsys, *words)
    assert a_file.read_text() == "keep" and {p.name for p in tmp_path.iterdir()} == {"file"}


def _tamper(source: Path, target: Path, header=None, tensors=None) -> Path:
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["imagic"])
        data = {key: handle.get_tensor(key) for key in handle.keys()}
    if header:
        header(meta)
    if tensors:
        tensors(data)
    save_file(data, str(target), metadata={"imagic": json.dumps(meta)})
    return target


def _lora_key(data: dict) -> str:
    return next(k for k in data if ".lora_A." in k)


HOSTILE_STATES = {
    "wrong type": (lambda h: h.update(height="32"), None, "'height' of the wrong type"),
    "missing key": (lambda h: h.pop("target_text"), None, "no 'target_text'"),
    "extra key": (lambda h: h.update(extra=1), None, "unknown header field 'extra'"),
    "old version": (lambda h: h.update(version=1), None, "older imagic"),
    "huge rank": (lambda h: h["settings"].update(lora_rank=10**6), None, "LoRA rank"),
    "rank unlike tensors": (lambda h: h["settings"].update(lora_rank=1000), None, "not of the header's rank 1000"),
    "huge image": (lambda h: h.update(height=100000, width=100000), None, "'height' of 100000"),
    "huge resolution": (lambda h: h["settings"].update(resolution=[16384, 16384]), None, "native"),
    "size unlike settings": (lambda h: h.update(height=64), None, "photo that is not 64x32"),
    "size unlike settings and photo": (lambda h: h.update(height=64), lambda d: d.pop("photo.pixels"), "size 64x32"),
    "bad settings": (lambda h: h["settings"]["embedding"].update(steps="many"), None, "embedding steps"),
    "bad identity": (lambda h: h["base_model"].update(components=[]), None, "'base_model.components'"),
    "nan embedding": (None, lambda d: d["e_opt.prompt_embeds"].fill_(float("nan")), "NaN"),
    "extra tensor": (None, lambda d: d.update({"junk.x": torch.zeros(2)}), "'junk.x'"),
    "missing tensor": (None, lambda d: d.pop(_lora_key(d)), "missing"),
    "wrong shape": (None, lambda d: d.update({_lora_key(d): torch.zeros(2, 3)}), "this model's is"),
    "wrong dtype": (None, lambda d: d.update({"e_tgt.prompt_embeds": d["e_tgt.prompt_embeds"].half()}), "float32"),
    "bad levels": (lambda h: h.update(levels=["unet", "unet"]), None, "'levels' that is not a list"),
    "unknown level": (None, lambda d: d.update({"weights.stage_9.x": torch.zeros(2)}), "'weights.stage_9.x'"),
    "other levels": (lambda h: h.update(levels=["unet", "stage_2"]), None, "levels unet, stage_2, this model has unet"),
}


def _as_version_2(header: dict) -> None:
    header.update(version=2)
    del header["levels"]


def _version_2_tensors(data: dict) -> None:
    for key in [k for k in data if k.startswith("weights.unet.")]:
        data["weights." + key.removeprefix("weights.unet.")] = data.pop(key)


def test_a_version_2_state_loads_as_one_level_and_samples_the_same(state_file, sd1_folder, tmp_path):
    old = _tamper(state_file, tmp_path / "v2.safetensors", _as_version_2, _version_2_tensors)
    state, loaded = EditState.load(old), EditState.load(state_file)
    assert state.levels == ["unet"] and state.weights.keys() == loaded.weights.keys() == {"unet"}
    for out, path in (("new", state_file), ("old", old)):
        assert main(["sample", str(path), "--model", str(sd1_folder), "--out", str(tmp_path / out), "--quiet",
                     *SAMPLE]) == 0
    assert (tmp_path / "new" / "grid.png").read_bytes() == (tmp_path / "old" / "grid.png").read_bytes()


@pytest.mark.parametrize("case", HOSTILE_STATES)
def test_hand_edited_state_is_one_line_in_bounded_memory(state_file, sd1_folder, tmp_path, capsys, case):
    header, tensors, words = HOSTILE_STATES[case]
    hostile = _tamper(state_file, tmp_path / "hostile.safetensors", header, tensors)
    out = tmp_path / "out"
    measured = _reset_peak_rss()
    base = _peak_rss_mib()
    code = main(["sample", str(hostile), "--model", str(sd1_folder), "--out", str(out), "--quiet", *SAMPLE])
    assert code == 1
    one_line(capsys, words)
    assert not out.exists()
    if measured:
        assert _peak_rss_mib() - base < 300  # refused before anything sized by the header was allocated


def _copy_with(sd1_folder: Path, tmp_path: Path, component: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(sd1_folder, model)
    if component == "scheduler":
        config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        config["beta_end"] *= 1.5
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        return model
    weights_file = next((model / component).glob("*.safetensors"))
    weights = load_file(weights_file)
    name = max((k for k in weights if weights[k].ndim > 1), key=lambda k: weights[k].numel())
    weights[name].view(-1)[1::4] *= -1  # a quarter of one tensor: what a strided probe of 64 values misses
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "scheduler"])
def test_state_on_a_changed_model_component_is_refused(state_file, sd1_folder, tmp_path, capsys, component):
    model = _copy_with(sd1_folder, tmp_path, component)
    out = tmp_path / "out"
    assert main(["sample", str(state_file), "--model", str(model), "--out", str(out), "--quiet", *SAMPLE]) == 1
    one_line(capsys, component)
    assert not out.exists()


def test_two_edits_into_one_folder_one_wins_and_the_folder_holds_its_run(sd1_folder, photo, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "imagic.cli", "edit", str(photo), "a dog", "--model", str(sd1_folder),
         "--out", str(out), *TRAIN, *SAMPLE, "--finetune-steps", "6"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never claimed the folder"
        time.sleep(0.05)
    second = main(["edit", str(photo), "a cat", "--model", str(sd1_folder), "--out", str(out), *TRAIN, *SAMPLE])
    assert second == 1
    one_line(capsys, "another imagic run", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    names = {p.name for p in out.iterdir()}
    # the first run's files only; neither a lock nor a temporary file is left
    assert names == {"eta0.6_seed0.png", "eta0.7_seed0.png", "eta0.8_seed0.png", "grid.png", "summary.json",
                     "state.safetensors"}
    summary = json.loads((out / "summary.json").read_text())
    with safe_open(str(out / "state.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()["imagic"])
    assert summary["target_text"] == header["target_text"] == "a dog"
    assert summary["losses"]["fine_tune"]["per_step"] == header["losses"]["fine_tune"]


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, capsys):
    from imagic.outputs import claim

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(str(dead.pid))
    with claim(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            with claim(tmp_path):
                pass
        assert (tmp_path / LOCK_NAME).exists()  # the refused claim left the holder's lock alone
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_interrupted_write_leaves_nothing_behind(tmp_path):
    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.png", half_then_fail)
    assert list(tmp_path.iterdir()) == []


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_shorter_than_its_header_is_refused_not_greyed(tmp_path):
    data = bytearray(_jpeg(scene_image(64, 48)))
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(bytes(data))
    assert load_image(whole).size == (64, 48)
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 7] = (96).to_bytes(2, "big")  # the header claims twice the rows its data holds
    tall = tmp_path / "tall.jpg"
    tall.write_bytes(bytes(data))
    scan = bytes(data).index(b"\xff\xda")
    early = tmp_path / "early.jpg"
    early.write_bytes(bytes(data[: scan + 300]) + b"\xff\xd9")
    for path in (tall, early):
        with pytest.raises(ImageInputError, match="ends before the image does|truncated"):
            load_image(path)


def test_batch_skips_a_broken_image_redoes_a_truncated_output_and_names_like_tedbench(
    sd1_folder, tmp_path, capsys
):
    folder = tmp_path / "bench"
    folder.mkdir()
    scene_image(32, 32, seed=1).save(folder / "bird.png")
    scene_image(32, 32, seed=2).save(folder / "bird.jpeg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pairs = [{"img_name": n, "target_text": "a photo of a bird."} for n in ("bird.png", "broken.png", "bird.jpeg")]
    (folder / "input_list.json").write_text(json.dumps(pairs))
    out = tmp_path / "out"
    args = ["batch", str(folder), "--model", str(sd1_folder), "--out", str(out), *TRAIN, *SAMPLE]
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "skipped 'broken.png'" in err[0] and "1 of 3 edits failed" in err[1]
    assert "Traceback" not in captured.err and "2 edited, 0 already" in captured.out
    names = {"bird.png-a_photo_of_a_bird.png", "bird.jpeg-a_photo_of_a_bird.png"}
    assert {p.name for p in out.iterdir()} == {*names, "summary.json"}  # with the settings that made each
    assert EditPair("apples.jpeg", "A basket of oranges.").output_name == "apples.jpeg-A_basket_of_oranges.png"

    kept = out / "bird.png-a_photo_of_a_bird.png"
    cut = out / "bird.jpeg-a_photo_of_a_bird.png"
    before = kept.stat().st_mtime_ns
    cut.write_bytes(cut.read_bytes()[:60])  # as a run killed by a copy tool would leave it
    (folder / "input_list.json").write_text(json.dumps([p for p in pairs if p["img_name"] != "broken.png"]))
    assert main(args) == 0
    assert "1 edited, 1 already" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == before and load_image(cut).size == (32, 32)


def test_a_cut_text_warns_once(sd1_folder, photo, tmp_path, capfd):
    text = " ".join(["a photo of a dog"] * 30)
    assert main(["train", str(photo), text, "--model", str(sd1_folder), "--state", str(tmp_path / "s.safetensors"),
                 *TRAIN, "--embedding-steps", "1", "--finetune-steps", "1"]) == 0
    err = capfd.readouterr().err
    assert sum("truncat" in line or "cut '" in line for line in err.splitlines()) == 1, err
