"""Editing a TEdBench-style benchmark: a folder of images and a JSON list of edits.

The list is `[{"img_name": "cat.jpeg", "target_text": "A photo of a cat sitting"}, ...]`
(TEdBench's input_list.json); images are looked up in the folder's `originals/` if it has one,
else in the folder itself. Each edit is trained and sampled at one eta and seed and written, as
TEdBench names its outputs, as `<img_name>-<target text, spaces as _, final full stop dropped>.png`
(`apples.jpeg-A_basket_of_oranges.png`). Each output is committed into the folder as it is done, with a record
in summary.json of the settings that made it; an output that decodes whole and was made with the same settings
is kept, so a stopped run resumes where it stopped, and one made otherwise is done again. An edit that fails (an
unreadable image, say) is reported in one line and the others go on. With a CLIP model, every output is scored (imagic.clip_score)
and the scores written to scores.json. With a reference folder of outputs named the same way
(TEdBench's own `tedbench/imagic/` holds the paper's), each pair gets a side-by-side of the input,
the reference and imagic's output under `compare/`, and the references are scored beside imagic's.
"""

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .clip_score import ClipScorer
from .errors import ImageInputError, ImagicError, OutputError, OutputExistsError, SettingsError, TrainingInterrupted
from .image_io import file_sha256, image_grid, load_image, save_image, to_rgb
from .inputs import read_limited
from .memory import MemorySettings
from .outputs import write_atomic
from .settings import SampleSettings
from .staging import SUMMARY_NAME, Run, read_record

LIST_FILE = "input_list.json"
# An output's file name at most: under the 255 bytes of every common file system, with room for what other tools
# add (a copy's " (1)", a download's ".part").
MAX_NAME_BYTES = 200
MAX_LIST_BYTES = 64 << 20  # TEdBench's list is 12 KB
MASKS_FOLDER = "masks"  # an edit's mask (--mask), named as its output
# Torch threads per edit, in both runners. A sum split over threads is added in another order, which moved a value
# of the output by one now and then; one thread is what a Ray task gets (a CPU each, so that a machine runs as many
# edits side by side as it has cores), so a batch stopped under one runner and resumed under the other writes the
# same bytes. On a GPU it only paces the little that runs on the CPU; on a CPU, --ray is the way to use every core.
EDIT_THREADS = 1


@dataclass(frozen=True)
class EditPair:
    img_name: str
    target_text: str

    @property
    def output_name(self) -> str:
        """TEdBench's name; one too long for a file name (over MAX_NAME_BYTES) is cut, and a hash of the whole pair
        keeps it its own."""
        text = "_".join(self.target_text.strip().removesuffix(".").split())
        name = _safe(f"{self.img_name}-{text}")
        if len(os.fsencode(name)) + 4 <= MAX_NAME_BYTES:
            return f"{name}.png"
        digest = hashlib.sha256(f"{self.img_name}\0{self.target_text}".encode()).hexdigest()[:16]
        cut = os.fsencode(name)[: MAX_NAME_BYTES - len(digest) - 5].decode(errors="ignore")
        return f"{cut}-{digest}.png"


def _safe(name: str) -> str:
    """A file name of its own: no folder separators, so every output stays inside the output folder."""
    return name.replace("/", "_").replace("\\", "_")


def images_folder(folder: Path) -> Path:
    return folder / "originals" if (folder / "originals").is_dir() else folder


def read_pairs(folder: str | os.PathLike, list_file: str | os.PathLike | None = None) -> list[EditPair]:
    """The list's pairs, checked before any work starts: readable JSON, both keys, every image present."""
    folder = Path(folder)
    path = Path(list_file) if list_file is not None else folder / LIST_FILE
    try:
        entries = json.loads(read_limited(path, "the edit list", SettingsError, MAX_LIST_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"the edit list '{path}' is not valid JSON: {error}") from None
    except RecursionError:
        raise SettingsError(f"the edit list '{path}' is nested too deep: it must be a list of entries") from None
    if not isinstance(entries, list) or not entries:
        raise SettingsError(f"the edit list '{path}' must be a non-empty JSON list of {{\"img_name\", \"target_text\"}}")
    pairs = [_pair(number, entry, path) for number, entry in enumerate(entries, start=1)]
    images = images_folder(folder)
    missing = [p.img_name for p in pairs if not _is_file(images / p.img_name)]
    if missing:
        raise SettingsError(f"{len(missing)} image(s) of the list are not in '{images}', e.g. '{missing[0]}'")
    named: dict[str, EditPair] = {}
    for pair in dict.fromkeys(pairs):  # an entry listed twice is one edit
        other = named.setdefault(pair.output_name, pair)
        if other != pair:
            raise SettingsError(f"entries '{other.img_name}' and '{pair.img_name}' of '{path}' would both be written "
                                f"as '{pair.output_name}': make their texts differ")
    return list(named.values())


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name longer than the file system takes
        return False


def _pair(number: int, entry, path: Path) -> EditPair:
    """One entry of the list: both keys, each a text (a name without NUL; a number or null is no text)."""
    if not isinstance(entry, dict) or not {"img_name", "target_text"} <= set(entry):
        raise SettingsError(f"entry {number} of '{path}' needs both \"img_name\" and \"target_text\"")
    for key in ("img_name", "target_text"):
        value = entry[key]
        if not isinstance(value, str):
            raise SettingsError(f"entry {number} of '{path}' has a \"{key}\" that is not a text: {json.dumps(value)[:60]}")
        if "\0" in value:
            raise SettingsError(f"entry {number} of '{path}' has a NUL character in its \"{key}\"")
    if not entry["img_name"].strip():
        raise SettingsError(f"entry {number} of '{path}' has an empty \"img_name\"")
    return EditPair(entry["img_name"], entry["target_text"])


@dataclass
class Summary:
    """The batch's summary.json: per output, the pair and the settings that made it (`record`), so that a rerun
    with other settings knows which outputs to do again. `replaces` is true while the folder's summary is another
    run's (an edit's), which the first output committed replaces whole."""

    outputs: dict[str, dict]
    replaces: bool = False

    @classmethod
    def read(cls, out: Path, overwrite: bool) -> "Summary":
        record = read_record(out / SUMMARY_NAME)
        if record is None or record.get("command") == "batch":
            outputs = record.get("outputs") if record else None
            return cls({k: v for k, v in outputs.items() if isinstance(v, dict)} if isinstance(outputs, dict) else {})
        if not overwrite:
            raise OutputExistsError(f"'{out / SUMMARY_NAME}' is another imagic run's: pass --overwrite to replace that "
                                    "run with this batch, or choose another --out")
        return cls({}, replaces=True)

    def commit(self, run: Run, pair: EditPair, record: dict) -> None:
        """Put a pair's staged output (and mask) in place together with its record."""
        name = pair.output_name
        self.outputs[name] = record
        summary = {"command": "batch", "outputs": self.outputs}
        write_atomic(run.path(SUMMARY_NAME), lambda path: path.write_text(json.dumps(summary, indent=1)), True)
        mask = f"{MASKS_FOLDER}/{name}"
        names = [name, *([mask] if (run.staging / mask).is_file() else []), SUMMARY_NAME]
        run.commit(names, overwrite=True, replace_earlier=self.replaces)
        self.replaces = False


def pair_record(pair: EditPair, folder: Path, settings: dict) -> dict:
    """What made a pair's output: the pair, its photo's bytes (by hash) and the batch's settings."""
    photo = images_folder(folder) / pair.img_name
    return json.loads(json.dumps({"img_name": pair.img_name, "target_text": pair.target_text,
                                  "image_sha256": file_sha256(photo), **settings}))


def plan_pairs(pairs: list[EditPair], folder: Path, out: Path, summary: Summary, settings: dict, overwrite: bool
               ) -> tuple[list[EditPair], int, int]:
    """The pairs to edit: those without a whole output, and those whose output a record shows was made otherwise
    (all of them with `overwrite`); with how many outputs are kept and how many are redone for their settings.
    An output without a record (copied in, or from an imagic before records) is kept."""
    todo, kept, redone = [], 0, 0
    for pair in pairs:
        if overwrite or not is_whole_image(out / pair.output_name):
            todo.append(pair)
            continue
        record = summary.outputs.get(pair.output_name)
        if record is None or record == pair_record(pair, folder, settings):
            kept += 1
            continue
        todo.append(pair)
        redone += 1
    return todo, kept, redone


def edit_pairs(
    editor, pairs: list[EditPair], folder: Path, out: Path, settings, *, eta: float, seed: int,
    sample_settings: SampleSettings, progress: bool = True, edited: Callable[[EditPair], None] | None = None,
    memory: MemorySettings = MemorySettings(),
) -> list[dict]:
    """Edit every pair into `out`, each trained with the `memory` levers; returns a record per pair. `edited(pair)`
    is called as each pair's output is done (the CLI commits it into the folder then, so a stopped batch keeps
    what it finished).

    A pair that fails with a user error (unreadable image, diverged training, a name too long for the
    file system) is reported on stderr in one line and skipped; Ctrl-C stops the whole run.
    """
    records = []
    for pair in tqdm(pairs, desc="edits", disable=not progress):
        result = edit_one(editor, pair, folder, out, settings, eta=eta, seed=seed, sample_settings=sample_settings,
                          progress=progress, memory=memory)
        report(pair, result)
        if edited is not None and result["status"] == "edited":
            edited(pair)
        records.append(result)
    return records


def edit_one(
    editor, pair: EditPair, folder: Path, out: Path, settings, *, eta: float, seed: int,
    sample_settings: SampleSettings, progress: bool = False, memory: MemorySettings = MemorySettings(),
) -> dict:
    """Train and sample one pair on EDIT_THREADS torch threads and write its output atomically; a user error gives
    a "failed" record with its one-line reason instead of an exception (Ctrl-C still stops)."""
    start = time.perf_counter()
    path = out / pair.output_name
    try:
        name_max = _name_max(out)
        if len(os.fsencode(pair.output_name)) > name_max:
            raise OutputError(f"its output name is {len(os.fsencode(pair.output_name))} bytes, over the "
                              f"{name_max} the file system allows: shorten its target text")
        photo = images_folder(folder) / pair.img_name
        with torch_threads(EDIT_THREADS):
            state = editor.train(photo, pair.target_text, settings, progress=progress, memory=memory)
            output = editor.sample(state, [eta], [seed], sample_settings, progress=progress, image=photo)
        if output.mask is not None:  # beside the outputs, under the same name, for a person to check
            save_image(output.mask, out / MASKS_FOLDER / pair.output_name, overwrite=True)
        save_image(output.images[(float(eta), int(seed))], path, overwrite=True)  # replaces a broken one
    except TrainingInterrupted:
        raise
    except ImagicError as error:
        return {"pair": pair.output_name, "status": "failed", "reason": str(error)}
    return {"pair": pair.output_name, "status": "edited", "seconds": time.perf_counter() - start}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op threads set to `count` for the block, then set back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def report(pair: EditPair, record: dict) -> None:
    """A failed pair's one line on stderr."""
    if record["status"] == "failed":
        print(f"imagic: skipped '{pair.img_name}' / '{pair.target_text}': {record['reason']}", file=sys.stderr)


def is_whole_image(path: Path) -> bool:
    """True when `path` is an image that decodes completely (a run killed mid-write leaves none, but a
    copy or another tool may): anything else is redone."""
    if not path.is_file():
        return False
    try:
        load_image(path)
    except ImageInputError:
        return False
    return True


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255  # the limit of every common file system


def score_pairs(scorer: ClipScorer, pairs: list[EditPair], folder: Path, out: Path,
                reference: Path | None = None) -> dict:
    """CLIP text score and fidelity per existing output, and their means; with `reference`, the reference
    output of the same name scored the same way beside each (means over the pairs that have one)."""
    scores = []
    for pair in pairs:
        path = out / pair.output_name
        if not is_whole_image(path):
            continue
        source = load_image(images_folder(folder) / pair.img_name)
        score = {"output": pair.output_name, "img_name": pair.img_name, "target_text": pair.target_text,
                 **scorer.score(load_image(path), source, pair.target_text)}
        if reference is not None and is_whole_image(reference / pair.output_name):
            score["reference"] = scorer.score(load_image(reference / pair.output_name), source, pair.target_text)
        scores.append(score)
    keys = ("clip_text_score", "clip_fidelity")
    result = {"scored": len(scores), "of": len(pairs), "means": _means(scores, keys), "per_output": scores}
    if reference is not None:
        compared = [s for s in scores if "reference" in s]
        result["reference"] = {"folder": str(reference), "pairs": len(compared),
                               "means": _means([s["reference"] for s in compared], keys),
                               "imagic_means_on_those_pairs": _means(compared, keys)}
    return result


def _means(scores: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    return {key: sum(s[key] for s in scores) / len(scores) for key in keys} if scores else {}


def write_comparisons(pairs: list[EditPair], folder: Path, out: Path, reference: Path) -> int:
    """Per pair with both an output and a reference of that name: input, reference and imagic side by side in
    out/compare/<output name>, at the output's size. Returns how many were written."""
    written = 0
    for pair in pairs:
        ours, theirs = out / pair.output_name, reference / pair.output_name
        if not (ours.is_file() and theirs.is_file()):
            continue
        try:  # decoded once each; one that does not decode whole is left out, as is_whole_image would
            output, reference_output = load_image(ours), load_image(theirs)
        except ImageInputError:
            continue
        cells = [to_rgb(image).resize(output.size)
                 for image in (load_image(images_folder(folder) / pair.img_name), reference_output)]
        grid = image_grid([[*cells, to_rgb(output)]], col_labels=["input", f"reference ({reference.name})", "imagic"])
        save_image(grid, out / "compare" / pair.output_name, overwrite=True)
        written += 1
    return written
