"""A run's outputs, written beside the folder's and swapped in together, so that a folder holds one run's outputs.

A run writes into a staging folder of its own inside the output folder (`.imagic-run-<pid>`), then `commit`
moves its files into place and removes the files of the earlier run it replaces (those the folder's
summary.json lists), so `--overwrite` never leaves a mix of two runs. A commit is journaled: the list of
moves and removals is written (atomically) before the first rename, and the next run that claims the
folder finishes a commit that a killed run left half done. A run that fails, is refused or is stopped
before its commit leaves the folder as it was; its staging folder is removed on the way out, or, after
a SIGKILL, by the next run.
"""

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError, OutputExistsError
from .outputs import claim, pid_alive, write_atomic

SUMMARY_NAME = "summary.json"
JOURNAL_NAME = ".imagic-commit.json"
_STAGING = re.compile(r"\.imagic-run-(\d+)")
_MAX_RECORD_BYTES = 64 << 20  # a summary or journal larger than this is no imagic record


def _plain(name: object) -> bool:
    """A name inside the folder: relative, no '..', not one of imagic's own hidden files."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/") or "\\" in name:
        return False
    parts = name.split("/")
    return all(part and part not in (".", "..") and not part.startswith(".") for part in parts)


def read_record(path: Path) -> dict | None:
    """A JSON record imagic wrote (a summary, a journal); None when it is missing, too large or not a JSON object."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def earlier_outputs(folder: Path) -> set[str]:
    """The files of the run whose summary.json the folder holds, by name (with that summary itself)."""
    record = read_record(folder / SUMMARY_NAME)
    if record is None:
        return set()
    listed = record.get("outputs")
    names = {Path(str(name)).name for name in listed} if isinstance(listed, list) else set()
    if isinstance(listed, dict):  # a batch's: its outputs and their masks
        names = {name for output in listed for name in (output, f"masks/{output}")}
    return {name for name in names if _plain(name)} | {SUMMARY_NAME}


class Run:
    """One run's files before they are committed: `path(name)` is where the run writes `name`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.staging = folder / f".imagic-run-{os.getpid()}"

    def path(self, name: str) -> Path:
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.folder / name)

    def fresh(self, names: Iterable[str]) -> bool:
        """Whether none of these outputs is in the folder yet: nothing an earlier run made would be replaced."""
        return not any(self.exists(name) for name in names)

    def check_free(self, names: Iterable[str], overwrite: bool) -> None:
        """Refuse, before any work, to replace an existing output unless asked to."""
        taken = next((name for name in names if self.exists(name)), None)
        if taken is not None and not overwrite:
            raise OutputExistsError(f"'{self.folder / taken}' already exists: pass --overwrite to replace it, or "
                                    "choose another --out")

    def commit(self, names: Iterable[str], overwrite: bool, keep: Iterable[str] = (), replace_earlier: bool = True,
               superseded: Iterable[str] = ()) -> None:
        """Move the staged `names` into the folder together. With `replace_earlier`, a commit that replaces any file
        of the earlier run (summary.json's) removes that run's other files too, except `keep` (a state being
        sampled). `superseded`: files of an earlier run that the caller knows by name, removed in the same swap."""
        names = list(names)
        missing = [name for name in names if not (self.staging / name).is_file()]
        if missing:
            raise RuntimeError(f"staged output '{missing[0]}' was never written")  # a bug, not the user's
        self.check_free(names, overwrite)
        remove: set[str] = set()
        earlier = earlier_outputs(self.folder) if replace_earlier else set()
        if earlier & set(names):
            remove = earlier - set(names) - set(keep)
        remove |= {name for name in superseded if _plain(name)} - set(names)
        journal = {"staging": self.staging.name, "move": names, "remove": sorted(remove)}
        write_atomic(self.folder / JOURNAL_NAME, lambda temporary: temporary.write_text(json.dumps(journal)), True)
        _apply(self.folder, journal)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _apply(folder: Path, journal: dict) -> None:
    """Carry out a commit's journal (again, after a killed run: a move already done is skipped), then drop it."""
    staging = folder / journal["staging"]
    try:
        for name in journal["move"]:
            source = staging / name
            if source.exists():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, folder / name)
        for name in journal["remove"]:
            (folder / name).unlink(missing_ok=True)
            parent = (folder / name).parent
            if "/" in name and parent.is_dir() and not any(parent.iterdir()):  # a replayed journal may find it gone
                parent.rmdir()  # a subfolder the run emptied (an export's unet/)
    except OSError as error:
        raise OutputError(f"cannot finish writing to '{folder}': {error.strerror or error}") from None
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _journal(folder: Path) -> dict | None:
    """A commit a killed run left half done, if its journal is one of ours."""
    journal = read_record(folder / JOURNAL_NAME)
    valid = (journal is not None and isinstance(journal.get("staging"), str)
             and _STAGING.fullmatch(journal["staging"]) is not None
             and all(isinstance(journal.get(key), list) and all(_plain(n) for n in journal[key])
                     for key in ("move", "remove")))
    return journal if valid else None


def recover(folder: Path) -> None:
    """What killed runs left in `folder` (claimed by this run): a half-done commit finished, staging folders of
    dead runs removed."""
    journal = _journal(folder)
    if journal is not None:
        _apply(folder, journal)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)  # one that is not ours could only mislead
    for path in folder.glob(".imagic-run-*"):
        match = _STAGING.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def claimed(folder: str | os.PathLike) -> Iterator[Run]:
    """Claim `folder` for one run (outputs.claim), finish what killed runs left there, and yield the run's
    staging; whatever it did not commit is removed on the way out."""
    with claim(folder) as path:
        recover(path)
        run = Run(path)
        try:
            yield run
        finally:
            run.discard()
