"""A guard for refactoring: the losses and output hashes of every tiny family and of the built-in model, full
and LoRA, recorded before a change and compared after it.

    .venv/bin/python scripts/guard.py record outputs/guard-before.json   # on the commit before the change
    .venv/bin/python scripts/guard.py compare outputs/guard-before.json  # after it: exit 1 on any difference

Each configuration trains a few steps and samples from noise and from the photo (and from an inversion where
the family has one), then saves the state, loads it back and samples again. Everything runs on one torch thread
on the CPU, so the same code gives the same bytes on the same machine.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagic.editor import ImagicEditor
from imagic.settings import StageSettings, TrainSettings
from imagic.state import EditState
from imagic.toy import build_tiny_pipeline

TEXT = "a photo of a red dog sitting"
SHAPES_TEXT = "a photo of a red person sitting"


def _photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 7) % 256, 90 + 50 * ((y // 4) % 2), (x * y) % 64], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _settings(method: str, steps: int, **options) -> TrainSettings:
    fine_tune_lr = 2e-3 if method == "lora" else 5e-4
    stages = {"embedding": StageSettings(steps, 5e-2), "fine_tune": StageSettings(steps, fine_tune_lr)}
    return TrainSettings(**{**stages, **options}, method=method, lora_rank=4)


def _digest(images: dict) -> dict[str, str]:
    return {f"eta{eta:g}_seed{seed}": hashlib.sha256(image.tobytes()).hexdigest()[:16]
            for (eta, seed), image in sorted(images.items())}


def _tensors_digest(state: EditState) -> str:
    digest = hashlib.sha256()
    groups = {"e_tgt": state.e_tgt, "e_opt": state.e_opt,
              **{f"weights.{level}": weights for level, weights in state.weights.items()}}
    for group, tensors in sorted(groups.items()):
        for name, tensor in sorted(tensors.items()):
            digest.update(f"{group}.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _run(editor: ImagicEditor, photo: Image.Image, text: str, settings: TrainSettings, starts: dict[str, dict],
         folder: Path) -> dict:
    state = editor.train(photo, text, settings, progress=False)
    record = {"losses": {stage: [float.hex(v) for v in values] for stage, values in state.losses.items()},
              "stages": state.stages, "tensors": _tensors_digest(state)}
    path = state.save(folder / "state.safetensors")
    for name, options in starts.items():
        record[name] = _digest(editor.sample(state, [0.5, 1.0], [0], progress=False, image=photo, **options).images)
    loaded = EditState.load(path)
    first = next(iter(starts))
    record[f"{first}-reloaded"] = _digest(editor.sample(loaded, [0.5, 1.0], [0], progress=False, image=photo,
                                                        **starts[first]).images)
    return record


def configurations():
    """(name, pipeline builder, photo size, text, settings, sampling starts) per configuration."""
    sample = {"num_inference_steps": 3, "guidance_scale": 4.0}
    noise, photo = {**sample, "strength": 1.0}, {**sample, "strength": 0.6}
    for kind in ("sd1", "sd2", "sdxl", "sd3", "flux"):
        starts = {"noise": noise, "photo": photo}
        if kind in ("sd1", "sd2", "sdxl"):
            starts["inverted"] = {**sample, "invert": True}
        for method in ("full", "lora"):
            yield f"{kind}-{method}", kind, (40, 32), TEXT, _settings(method, 3), starts
    for method in ("full", "lora"):
        yield f"if-{method}", "if+ii", (16, 16), TEXT, _settings(method, 3), {"noise": noise, "photo": photo}
    forgedit = _settings("lora", 3, joint=True, embedding=StageSettings(0, 5e-2),
                         fine_tune=StageSettings(6, 2e-3, copies=2, stop_ratio=0.99, check_every=3))
    yield "sd1-forgedit", "sd1", (40, 32), TEXT, forgedit, {
        "project": {**noise, "mix": "project"}, "forget-decoder": {**noise, "forget": "decoder"}}
    shapes_sample = {"num_inference_steps": 4, "guidance_scale": 4.0}
    for method in ("full", "lora"):
        yield f"shapes-{method}", "shapes", (64, 64), SHAPES_TEXT, _settings(method, 5), {
            "photo": {**shapes_sample, "strength": 0.7}, "noise": {**shapes_sample, "strength": 1.0}}


def _editor(kind: str, folder: Path) -> ImagicEditor:
    if kind == "shapes":
        return ImagicEditor.from_pretrained("shapes", device="cpu")
    if kind == "if+ii":
        return ImagicEditor(build_tiny_pipeline("if", folder / "tok"), build_tiny_pipeline("if-ii", folder / "tok2"))
    return ImagicEditor(build_tiny_pipeline(kind, folder / "tok"))


def record_all() -> dict:
    torch.set_num_threads(1)
    records, editors = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, kind, size, text, settings, starts in configurations():
            if kind not in editors:
                editors[kind] = _editor(kind, Path(folder) / kind)
            records[name] = _run(editors[kind], _photo(*size), text, settings, starts, Path(folder))
            print(f"{name}: done", file=sys.stderr)
    return records


def _differences(before: dict, after: dict, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            found += _differences(before.get(key), after.get(key), f"{path}/{key}")
        return found
    return [] if before == after else [f"{path}: {before} -> {after}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    records = record_all()
    if args.action == "record":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(records, indent=1))
        print(f"recorded {len(records)} configurations to '{args.file}'")
        return 0
    differences = _differences(json.loads(args.file.read_text()), records)
    for line in differences:
        print(line)
    print(f"{len(records)} configurations: {'identical' if not differences else f'{len(differences)} differences'}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
