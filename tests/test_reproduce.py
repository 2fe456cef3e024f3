"""A saved edit state gives back its edit anywhere: it carries its photo, how its edit was shown and every model it
was trained on, so `imagic sample STATE` alone gives the edit's images byte for byte; older states still sample,
with one line saying what they lack."""

import json

from safetensors import safe_open
from safetensors.torch import save_file

from imagic.cli import main
from imagic.state import EditState

FAST = ["--embedding-steps", "3", "--finetune-steps", "3", "--method", "lora", "--lora-rank", "2", "--steps", "3",
        "--quiet"]


def test_sample_alone_gives_the_edits_images_from_the_photo_it_carries(sd1_folder, photo, tmp_path):
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a red dog", "--model", str(sd1_folder), "--out", str(out), "--eta", "1",
                 "--seed", "4", "--strength", "0.6", "--mask", "auto", "--guidance-scale", "3", *FAST]) == 0
    state = EditState.load(out / "state.safetensors")
    assert state.photo_image.size == (state.width, state.height) and state.sampling["strength"] == 0.6
    assert state.sampling["mask"] == "auto" and state.sampling["guidance_scale"] == 3
    again = tmp_path / "again"  # no --image, --strength, --mask or guidance: as the edit was shown
    assert main(["sample", str(out / "state.safetensors"), "--eta", "1", "--seed", "4", "--quiet", "--out",
                 str(again)]) == 0
    assert (again / "eta1_seed4.png").read_bytes() == (out / "eta1_seed4.png").read_bytes()
    assert (again / "mask.png").read_bytes() == (out / "mask.png").read_bytes()
    other = tmp_path / "other"  # what is given wins over how it was shown
    assert main(["sample", str(out / "state.safetensors"), "--eta", "1", "--seed", "4", "--strength", "1", "--quiet",
                 "--out", str(other)]) == 0
    assert json.loads((other / "summary.json").read_text())["sampling"]["strength"] == 1.0


def test_a_cascade_state_brings_back_its_super_resolution_model(if_folders, photo, tmp_path):
    stage_1, stage_2 = if_folders
    out = tmp_path / "edit"
    assert main(["edit", str(photo), "a photo of a red dog", "--model", str(stage_1), "--super-resolution",
                 str(stage_2), "--out", str(out), "--eta", "1", *FAST]) == 0
    assert EditState.load(out / "state.safetensors").super_resolution == str(stage_2)
    again = tmp_path / "again"
    assert main(["sample", str(out / "state.safetensors"), "--eta", "1", "--quiet", "--out", str(again)]) == 0
    assert (again / "eta1_seed0.png").read_bytes() == (out / "eta1_seed0.png").read_bytes()


def test_a_state_of_an_earlier_version_still_samples_and_says_what_it_lacks(sd1_folder, photo, tmp_path, capsys):
    out = tmp_path / "edit"
    assert main(["train", str(photo), "a photo of a red dog", "--model", str(sd1_folder), "--state",
                 str(out / "state.safetensors"), *FAST[:-3], "--quiet"]) == 0
    with safe_open(str(out / "state.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()["imagic"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith("photo.")}
    for key in ("sampling", "super_resolution"):
        del header[key]
    old = tmp_path / "version-3.safetensors"
    save_file(tensors, str(old), metadata={"imagic": json.dumps({**header, "version": 3})})
    capsys.readouterr()
    assert main(["sample", str(old), "--eta", "1", "--quiet", "--out", str(tmp_path / "s")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "carries no photo" in warnings[0] and "--image" in warnings[0]
    assert main(["sample", str(old), "--eta", "1", "--strength", "0.5", "--quiet", "--out", str(tmp_path / "t")]) == 1
    assert "this edit state carries none: add --image PHOTO" in capsys.readouterr().err
    assert main(["sample", str(old), "--image", str(photo), "--eta", "1", "--strength", "0.5", "--quiet", "--out",
                 str(tmp_path / "u")]) == 0
