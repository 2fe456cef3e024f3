"""The second hostile-input battery, through the real CLI: runs that mix or lose data, wrong results with exit code
0, tracebacks, hangs and unbounded memory. Each case ends in exit code 1 and one line on stderr (or a correct
result), leaves the output folder as the last complete run left it, and stays within bounded memory."""

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import SchedulerMixin
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from imagic.cli import main
from imagic.outputs import LOCK_NAME

from helpers import scene_image, stop_during_fine_tuning

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
T = ["--embedding-steps", "2", "--finetune-steps", "2", "--quiet", "--method", "lora", "--lora-rank", "2"]
S = [*T, "--steps", "2"]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def refused(capsys, argv: list[str], *words: str) -> str:
    """`imagic argv` exits with 1 and one line on stderr holding `words`."""
    assert main(argv) == 1
    return one_line(capsys, *words)


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a blocked open or read is interrupted by the alarm."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(*argv: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagic.cli", *argv], env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)


def header_of(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["imagic"])


def tampered(source: Path, target: Path, header=None, tensors=None, raw_header: str | None = None) -> Path:
    """A copy of a state file with its header and tensors changed."""
    data, meta = load_file(str(source)), header_of(source)
    if header:
        header(meta)
    if tensors:
        tensors(data)
    save_file(data, str(target), metadata={"imagic": raw_header if raw_header is not None else json.dumps(meta)})
    return target


@pytest.fixture(scope="module")
def finished(sd1_folder, photo, tmp_path_factory) -> Path:
    """A finished edit's folder: images, grid, state and summary."""
    out = tmp_path_factory.mktemp("finished") / "O"
    assert main(["edit", str(photo), "a photo of a red dog", "--model", str(sd1_folder), "--out", str(out), *S]) == 0
    return out


@pytest.fixture
def earlier(finished, tmp_path) -> Path:
    """A copy of the finished edit's folder to run into."""
    return Path(shutil.copytree(finished, tmp_path / "O"))


@pytest.fixture(scope="module")
def full_state(sd1_folder, photo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("full") / "full.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(path), *T,
                 "--method", "full"]) == 0
    return path


# 1, 14. One lock per folder, whatever file a command names; a lock that is no lock file is one line.

def test_train_into_a_folder_an_edit_is_writing_is_refused(sd1_folder, photo, tmp_path, capsys):
    out = tmp_path / "O"
    first = cli("edit", str(photo), "a photo of a red dog", "--model", str(sd1_folder), "--out", str(out), *S,
                "--finetune-steps", "40")
    limit = time.monotonic() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < limit, first.communicate()[1]
        time.sleep(0.05)
    refused(capsys, ["train", str(photo), "a photo of a blue cat", "--model", str(sd1_folder), "--state",
                     str(out / "state.safetensors"), "--overwrite", *T], "another imagic run", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_text"] == header_of(out / "state.safetensors")["target_text"] == "a photo of a red dog"
    assert {p.name for p in out.iterdir()} == set(summary["outputs"])


@pytest.mark.parametrize("command", ["edit", "train"])
@pytest.mark.parametrize("lock", ["directory", "fifo"])
def test_a_lock_that_is_a_directory_or_a_fifo_is_one_line(sd1_folder, photo, tmp_path, capsys, command, lock):
    out = tmp_path / "O"
    out.mkdir()
    (out / LOCK_NAME).mkdir() if lock == "directory" else os.mkfifo(out / LOCK_NAME)
    target = ["--out", str(out), *S] if command == "edit" else ["--state", str(out / "s.safetensors"), *T]
    with deadline(20):
        refused(capsys, [command, str(photo), "a dog", "--model", str(sd1_folder), *target],
                "not an imagic lock file", "directory" if lock == "directory" else "FIFO")
    assert {p.name for p in out.iterdir()} == {LOCK_NAME}


def test_a_lock_holding_no_pid_is_taken_over(state_file, sd1_folder, tmp_path, capsys):
    out = tmp_path / "O"
    out.mkdir()
    (out / LOCK_NAME).write_text("²")
    assert main(["sample", str(state_file), "--model", str(sd1_folder), "--out", str(out), "--eta", "0.7",
                 "--steps", "2", "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"eta0.7_seed0.png", "grid.png", "summary.json"}


@pytest.fixture(scope="module")
def state_file(sd1_folder, photo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("state") / "edit.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(path), *T]) == 0
    return path


# 2, 15. A run that stops or fails leaves the folder as the last complete run left it.

def test_ctrl_c_during_an_overwriting_edit_leaves_the_earlier_edit(sd1_folder, photo, earlier):
    before = files(earlier)
    process = cli("edit", str(photo), "a photo of a blue cat", "--model", str(sd1_folder), "--out", str(earlier),
                  "--overwrite", "--embedding-steps", "2", "--finetune-steps", "100000", "--method", "lora",
                  "--lora-rank", "2")
    rest = stop_during_fine_tuning(process)
    assert process.returncode == 130, rest
    assert "kept the earlier outputs" in rest and "Traceback" not in rest
    assert files(earlier) == before


@contextlib.contextmanager
def file_size_limit(limit: int):
    """No file written past `limit` bytes (Python ignores SIGXFSZ: a write past it fails), as `prlimit --fsize`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_file_size_limit_while_the_state_is_written_is_one_line(sd1_folder, photo, earlier, capsys):
    before = files(earlier)
    limit = (earlier / "state.safetensors").stat().st_size // 2  # the images are far smaller than the state
    assert all(len(data) < limit for name, data in before.items() if name != "state.safetensors")
    with file_size_limit(limit):
        code = main(["edit", str(photo), "a photo of a blue cat", "--model", str(sd1_folder), "--out", str(earlier),
                     "--overwrite", *S])
    assert code == 1
    one_line(capsys, "cannot write", "File too large")
    assert files(earlier) == before


@contextlib.contextmanager
def small_disk(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted on `folder` (as root); skipped where mounting is not permitted."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (as root only): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_while_the_state_is_written_is_one_line(sd1_folder, finished, photo, tmp_path, capsys):
    size = sum(len(data) for data in files(finished).values())
    # Room for the finished edit and half its state again: the new state, written beside the old, cannot fit.
    with small_disk(tmp_path / "disk", size + (finished / "state.safetensors").stat().st_size // 2) as disk:
        out = Path(shutil.copytree(finished, disk / "O"))
        before = files(out)
        refused(capsys, ["edit", str(photo), "a photo of a blue cat", "--model", str(sd1_folder), "--out", str(out),
                         "--overwrite", *S], "cannot write", "No space left on device")
        assert files(out) == before


# 3. File names that collide are refused before any work.

def test_etas_that_print_alike_are_refused_before_any_work(sd1_folder, photo, tmp_path, earlier, capsys):
    for out, extra in ((tmp_path / "new", []), (earlier, ["--overwrite"])):
        before = files(out) if out.exists() else None
        refused(capsys, ["edit", str(photo), "a dog", "--model", str(sd1_folder), "--out", str(out), *S,
                         "--eta", "0.8", "0.8000001", *extra], "0.8", "0.8000001")
        assert (files(out) if out.exists() else None) == before


# 4. A batch records the settings of each output and redoes the outputs made otherwise.

def test_a_batch_rerun_with_other_settings_redoes_its_outputs(sd1_folder, tmp_path, capsys):
    folder = tmp_path / "bench"
    folder.mkdir()
    scene_image(32, 32, seed=1).save(folder / "dog.png")
    (folder / "input_list.json").write_text(json.dumps([{"img_name": "dog.png", "target_text": "a sitting dog"}]))
    out, name = tmp_path / "out", "dog.png-a_sitting_dog.png"
    args = ["batch", str(folder), "--model", str(sd1_folder), "--out", str(out), *S]
    assert main(args) == 0 and "1 edited, 0 already" in capsys.readouterr().out
    first = (out / name).read_bytes()
    assert main(args) == 0 and "0 edited, 1 already" in capsys.readouterr().out
    assert main([*args, "--seed", "7"]) == 0
    shown = capsys.readouterr().out
    assert "made with other settings" in shown and "1 edited, 0 already" in shown
    record = json.loads((out / "summary.json").read_text())["outputs"][name]
    assert record["seed"] == 7 and record["target_text"] == "a sitting dog" and record["train"]["lora_rank"] == 2
    assert (out / name).read_bytes() != first


# 5. What a killed run leaves is removed by the next run.

def test_a_run_killed_while_writing_the_state_leaves_nothing_after_the_next_run(sd1_folder, photo, tmp_path):
    out = tmp_path / "O"
    killer = textwrap.dedent("""
        import os, signal, sys
        import imagic.state
        def half_then_killed(tensors, path, metadata=None):
            open(path, "wb").write(b"\\0" * 100_000)
            os.kill(os.getpid(), signal.SIGKILL)
        imagic.state.save_file = half_then_killed
        from imagic.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = ["train", str(photo), "a dog", "--model", str(sd1_folder), "--state", str(out / "s.safetensors"), *T]
    killed = subprocess.run([sys.executable, "-c", killer, *args], env=ENV, cwd=ROOT, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") for p in out.rglob("*"))  # what the kill left
    assert main(args) == 0
    assert {str(p.relative_to(out)) for p in out.rglob("*")} == {"s.safetensors"}


# 6. Values, not only NaN: bounded settings and state tensors, and no picture of NaN.

@pytest.mark.parametrize("options, words", [
    (["--eta", "1e30"], ["eta", "-100 to 100"]),
    (["--eta=-1e30"], ["eta", "-100 to 100"]),
    (["--guidance-scale", "1e30"], ["guidance scale", "0 to 100"]),
])
def test_huge_etas_and_guidance_are_refused(state_file, sd1_folder, tmp_path, capsys, options, words):
    out = tmp_path / "out"
    refused(capsys, ["sample", str(state_file), "--model", str(sd1_folder), "--out", str(out), "--steps", "2",
                     "--quiet", *options], *words)
    assert not out.exists()


def _set_all(prefix: str, value: float):
    def change(data: dict) -> None:
        for key in [k for k in data if k.startswith(prefix)]:
            data[key] = torch.full_like(data[key], value)
    return change


HUGE_VALUES = {
    "lora weights": ("lora", None, _set_all("weights.unet.", 1e19), "a value of 1e+19"),
    "full weights": ("full", None, _set_all("weights.unet.conv_in.weight", 3e38), "a value of 3e+38"),
    "e_tgt": ("lora", None, _set_all("e_tgt.", 3e38), "'e_tgt.prompt_embeds'"),
    "lora alpha": ("lora", lambda h: h["settings"].update(lora_alpha=1e300), None, "LoRA alpha"),
}


@pytest.mark.parametrize("case", HUGE_VALUES)
def test_states_holding_huge_values_are_refused(state_file, full_state, sd1_folder, tmp_path, capsys, case):
    method, header, tensors, words = HUGE_VALUES[case]
    hostile = tampered(full_state if method == "full" else state_file, tmp_path / "s.safetensors", header, tensors)
    out = tmp_path / "out"
    refused(capsys, ["sample", str(hostile), "--model", str(sd1_folder), "--out", str(out), "--steps", "2",
                     "--quiet"], words)
    assert not out.exists()


def test_a_picture_of_nan_is_an_error_not_a_png(state_file, sd1_folder, tmp_path, capsys):
    hostile = tampered(state_file, tmp_path / "s.safetensors", tensors=_set_all("weights.unet.", 60000.0))
    out = tmp_path / "out"
    refused(capsys, ["sample", str(hostile), "--model", str(sd1_folder), "--out", str(out), "--steps", "2",
                     "--quiet"], "sampling gave")
    assert not out.exists()


# 7, 13. A state is untrusted: its levels have their tensors, its header is type-checked and bounded.

@pytest.fixture(scope="module")
def cascade_state(if_folders, photo, tmp_path_factory) -> Path:
    stage_1, stage_2 = if_folders
    path = tmp_path_factory.mktemp("if") / "if.safetensors"
    assert main(["train", str(photo), "a dog", "--model", str(stage_1), "--super-resolution", str(stage_2),
                 "--state", str(path), *T]) == 0
    return path


@pytest.mark.parametrize("level", ["stage_1", "stage_2"])
def test_a_cascade_state_missing_a_trained_levels_weights_is_refused(cascade_state, if_folders, tmp_path, capsys,
                                                                     level):
    hostile = tampered(cascade_state, tmp_path / "s.safetensors",
                       tensors=lambda d: [d.pop(k) for k in list(d) if k.startswith(f"weights.{level}.")])
    assert header_of(hostile)["stages"] == header_of(cascade_state)["stages"]  # still says the level finished
    out = tmp_path / "out"
    refused(capsys, ["sample", str(hostile), "--model", str(if_folders[0]), "--super-resolution",
                     str(if_folders[1]), "--out", str(out), "--steps", "2", "--quiet"], f"level '{level}'")
    assert not out.exists()


DEEP = "[" * 200_000 + "]" * 200_000
HOSTILE_HEADERS = {
    "levels of lists": (lambda h: h.update(levels=[["unet"]]), None, None, "'levels'"),
    "levels of objects": (lambda h: h.update(levels=[{}]), None, None, "'levels'"),
    "nested 200,000 deep": (None, None, DEEP, "nested"),
    "long model name": (lambda h: h["base_model"].update(name="m" * 5000), None, None, "base_model.name"),
    "a level's tensor without a name": (None, lambda d: d.update({"weights.unet": torch.zeros(2)}), None,
                                        "'weights.unet'"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_hostile_state_headers_are_one_line(state_file, full_state, tmp_path, capsys, case):
    header, tensors, raw, words = HOSTILE_HEADERS[case]
    source = full_state if "tensor" in case else state_file
    hostile = tampered(source, tmp_path / "s.safetensors", header, tensors, raw)
    out = tmp_path / "out"
    refused(capsys, ["sample", str(hostile), "--out", str(out), "--steps", "2", "--quiet"], words)
    assert not out.exists()


def test_a_model_name_of_5000_characters_is_one_line(photo, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["edit", str(photo), "a dog", "--model", "m" * 5000, "--out", str(out), *S], "5,000 characters")
    assert not out.exists()


def test_a_batch_list_nested_200000_deep_is_one_line(tmp_path, capsys):
    (tmp_path / "input_list.json").write_text(DEEP)
    refused(capsys, ["batch", str(tmp_path), "--out", str(tmp_path / "out"), *S], "nested too deep")
    assert not (tmp_path / "out").exists()


# 8. The model identity sees weights that changed places.

def _permuted(sd1_folder: Path, tmp_path: Path, component: str, how: str) -> Path:
    model = Path(shutil.copytree(sd1_folder, tmp_path / "model"))
    weights_file = next((model / component).glob("*.safetensors"))
    weights = load_file(weights_file)
    name = max(weights, key=lambda k: weights[k].numel())
    tensor = weights[name]
    moved = tensor.flip(0) if how == "rows reversed" else tensor.reshape(-1).roll(tensor.numel() // 2).view_as(tensor)
    assert not torch.equal(moved, tensor)
    weights[name] = moved.contiguous()
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("component, how", [("unet", "rows reversed"), ("vae", "rows reversed"),
                                            ("text_encoder", "rows reversed"), ("unet", "halves swapped")])
def test_a_model_whose_weights_changed_places_is_refused(state_file, sd1_folder, tmp_path, capsys, component, how):
    model = _permuted(sd1_folder, tmp_path, component, how)
    out = tmp_path / "out"
    refused(capsys, ["sample", str(state_file), "--model", str(model), "--out", str(out), "--steps", "2", "--quiet"],
            f"its {component} differs")
    assert not out.exists()


def test_a_version_4_states_identity_is_still_checked_and_accepted(state_file, sd1_folder, tmp_path, capsys):
    def as_version_4(header: dict) -> None:
        header["version"] = 4
        for component in header["base_model"]["components"].values():
            component["probe"] = [probe[:4] for probe in component["probe"]]

    old = tampered(state_file, tmp_path / "v4.safetensors", as_version_4)
    assert main(["sample", str(old), "--model", str(sd1_folder), "--out", str(tmp_path / "out"), "--steps", "2",
                 "--quiet"]) == 0
    model = _permuted(sd1_folder, tmp_path, "unet", "rows reversed")
    assert main(["sample", str(old), "--model", str(model), "--out", str(tmp_path / "other"), "--steps", "2",
                 "--quiet"]) == 0  # what version 4 could not see, it still does not
    capsys.readouterr()


# 9, 12. A batch's texts are texts, and its output names fit the file system.

@pytest.mark.parametrize("text", [None, ["a", "dog"], 5, "a\0dog"])
def test_batch_texts_that_are_no_texts_are_refused_before_any_work(bench_folder, tmp_path, capsys, text):
    entries = [{"img_name": "dog.png", "target_text": "a dog"}, {"img_name": "cat.jpeg", "target_text": text}]
    (bench_folder / "input_list.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    refused(capsys, ["batch", str(bench_folder), "--out", str(out), *S], "entry 2", "target_text")
    assert not out.exists()


def test_batch_texts_too_long_for_a_file_name_are_edited_under_a_short_name(bench_folder, sd1_folder, tmp_path,
                                                                            capfd):
    entries = [{"img_name": "dog.png", "target_text": "a dog " * 50}, {"img_name": "dog.png", "target_text": "x " * 50_000},
               {"img_name": "cat.jpeg", "target_text": "a red cat"}]
    (bench_folder / "input_list.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    assert main(["batch", str(bench_folder), "--model", str(sd1_folder), "--out", str(out), *S]) == 0
    captured = capfd.readouterr()
    assert "3 edited" in captured.out and "Traceback" not in captured.err
    outputs = [p for p in out.iterdir() if p.suffix == ".png"]
    assert len(outputs) == 3 and all(len(os.fsencode(p.name)) <= 200 for p in outputs)


# 10, 16, 18. Inputs: progressive JPEGs whole, sizes bounded from the header, regular files only.

def test_a_progressive_jpeg_cut_after_its_first_scan_is_refused(sd1_folder, tmp_path, capsys):
    buffer = io.BytesIO()
    scene_image(64, 48).save(buffer, "JPEG", quality=90, progressive=True)
    data = buffer.getvalue()
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[:second_scan] + b"\xff\xd9")
    assert Image.open(cut).convert("RGB").size == (64, 48)  # Pillow decodes it, blurred, without a word
    out = tmp_path / "out"
    refused(capsys, ["edit", str(cut), "a dog", "--model", str(sd1_folder), "--out", str(out), *S], "progressive")
    assert not out.exists()


@pytest.mark.parametrize("what", ["image", "state", "list", "mask"])
def test_a_fifo_given_as_an_input_is_one_line_not_a_hang(state_file, sd1_folder, photo, tmp_path, capsys, what):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    argv = {"image": ["edit", str(fifo), "a dog", "--model", str(sd1_folder), "--out", str(out), *S],
            "state": ["sample", str(fifo), "--model", str(sd1_folder), "--out", str(out), "--quiet"],
            "list": ["batch", str(tmp_path), "--list", str(fifo), "--out", str(out), *S],
            "mask": ["edit", str(photo), "a dog", "--mask", str(fifo), "--out", str(out), *S]}[what]
    with deadline(20):
        refused(capsys, argv, "FIFO")
    assert not out.exists()


LIMITED = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from imagic.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    print("BEGIN", flush=True, file=sys.stderr)
    try:
        code = main(argv)
    except BaseException as error:  # what the old code did: MemoryError, an allocation's RuntimeError
        code = repr(error)[:200]
    results.append(code)
    print("END", flush=True, file=sys.stderr)
print(json.dumps({"codes": results, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.fixture(scope="module")
def under_4_gib(tmp_path_factory) -> dict:
    """A picture of 1 x 1,000,000 pixels and a step of 256 copies at 256 px, in one process limited to 4 GiB."""
    folder = tmp_path_factory.mktemp("memory")
    Image.new("RGB", (1, 1_000_000), "red").save(folder / "thin.png")
    scene_image(64, 64).save(folder / "photo.png")
    runs = [["edit", str(folder / "thin.png"), "a dog", "--out", str(folder / "thin"), *S],
            ["edit", str(folder / "photo.png"), "a dog", "--out", str(folder / "copies"), *S, "--copies", "256",
             "--resolution", "256"]]
    done = subprocess.run([sys.executable, "-c", LIMITED, json.dumps(runs)], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    stderr = [part.split("END")[0].strip() for part in done.stderr.split("BEGIN")[1:]]
    return {"result": json.loads(done.stdout.strip().splitlines()[-1]), "stderr": stderr, "folder": folder}


def test_a_picture_of_1_by_1000000_pixels_is_refused_from_its_header(under_4_gib):
    assert under_4_gib["result"]["codes"][0] == 1
    lines = under_4_gib["stderr"][0].splitlines()
    assert len(lines) == 1 and "longer than 32 times" in lines[0], lines
    assert not (under_4_gib["folder"] / "thin").exists()


def test_copies_times_resolution_beyond_memory_are_refused_before_allocation(under_4_gib):
    assert under_4_gib["result"]["codes"][1] == 1
    lines = under_4_gib["stderr"][1].splitlines()
    assert len(lines) == 1 and "256 noised copies" in lines[0] and "GiB is free" in lines[0], lines
    assert under_4_gib["result"]["peak_mib"] < 3000
    assert not (under_4_gib["folder"] / "copies").exists()


# 11, 19. Paths and devices checked before anything is written.

def test_an_empty_out_is_refused_not_the_current_folder(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["edit", str(photo), "a dog", "--out", "", *S], "empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cuda:99" if torch.cuda.is_available() else "cuda", "meta", "bogus", ""])
def test_a_device_this_torch_cannot_compute_on_is_one_line(sd1_folder, photo, tmp_path, capsys, device):
    out = tmp_path / "out"
    refused(capsys, ["edit", str(photo), "a dog", "--model", str(sd1_folder), "--device", device, "--out", str(out),
                     *S], "device")
    assert not out.exists()


# 20. Every diffusers scheduler samples or is refused in one line, before any training.

SCHEDULERS = sorted(name for name in dir(diffusers) if name.endswith("Scheduler")
                    and isinstance(getattr(diffusers, name), type) and issubclass(getattr(diffusers, name), SchedulerMixin))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # as outside pytest: a library's notices are not shown
def test_every_diffusers_scheduler_samples_or_is_one_line(state_file, sd1_folder, tmp_path, capsys):
    refusals = []
    for name in SCHEDULERS:
        out = tmp_path / name
        code = main(["sample", str(state_file), "--model", str(sd1_folder), "--out", str(out), "--eta", "0.7",
                     "--steps", "2", "--quiet", "--scheduler", name])
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == code, (name, err)
        assert (out / "eta0.7_seed0.png").is_file() if code == 0 else not out.exists(), name
        refusals += [name] if code else []
    assert "ScoreSdeVeScheduler" in refusals and "DDIMScheduler" not in refusals


def test_a_scheduler_that_cannot_sample_is_refused_before_training(sd1_folder, photo, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, ["edit", str(photo), "a dog", "--model", str(sd1_folder), "--out", str(out), *S,
                     "--scheduler", "ScoreSdeVeScheduler"], "ScoreSdeVeScheduler")
    assert not out.exists()


# Export claims the folder and swaps its files in together, as every command writes.

def test_an_export_that_fails_leaves_the_earlier_export(state_file, full_state, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(state_file), str(out)]) == 0
    before = files(out)
    weights = sum(len(data) for name, data in before.items() if name.endswith(".safetensors"))
    with file_size_limit(weights // 2):  # the full fine-tune's denoiser is larger; its config.json is written first
        refused(capsys, ["export", str(full_state), str(out), "--overwrite"], "cannot write", "File too large")
    assert files(out) == before
    assert main(["export", str(full_state), str(out), "--overwrite"]) == 0
    assert (out / "unet" / "config.json").is_file() and not any(p.name.startswith(".imagic") for p in out.rglob("*"))
