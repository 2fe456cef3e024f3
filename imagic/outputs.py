"""Output safety: one run per output folder, and files that appear whole or not at all.

`claim` takes a folder for a run with a lock file created with O_EXCL that holds the run's pid;
it is removed when the run ends, and a lock whose pid is dead (a killed run) is taken over. Every
command that writes into a folder claims it the same way, whatever file it names. `write_atomic`
writes to a temporary name in the same folder and renames it into place, so no reader sees a
half-written PNG, state or summary. What a killed run leaves (temporary files, its staging folder,
a half-done commit: staging.py) is cleaned up by the next run that claims the folder.
"""

import contextlib
import errno
import itertools
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from safetensors import SafetensorError

from .errors import OutputError, OutputExistsError
from .inputs import kind

LOCK_NAME = ".imagic.lock"
# A lock file still empty after this long was left by a run killed between creating and writing it.
_EMPTY_LOCK_GRACE_S = 10.0
_temp_names = itertools.count()
# What runs leave beside their outputs, by the pid of the run: temporary files and stale locks set aside.
_LEFT_BY_RUNS = re.compile(r"\.imagic-(\d+)-\d+\.tmp|\.imagic\.lock\.stale-(\d+)")


def _describe(error: OSError) -> str:
    if error.errno == errno.ENAMETOOLONG:
        return "a file name is longer than the file system allows"
    return error.strerror or str(error)


def make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created (innermost last)."""
    try:
        missing = [p for p in (folder, *folder.parents) if not _exists(p)][::-1]
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if isinstance(error, (FileExistsError, NotADirectoryError)) or _exists(folder):
            raise OutputError(f"cannot write to '{folder}': it is a file, not a folder; choose another --out") from None
        raise OutputError(f"cannot create the output folder '{folder}': {_describe(error)}") from None
    return missing


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise OutputError(f"cannot write to '{path}': {_describe(error)}") from None
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except (OverflowError, ValueError):
        return False
    return True


def _holder(lock: Path) -> int | None:
    """The pid in a live lock; None when the lock is stale (its run is gone) or vanished. A lock that is not a
    regular file (a folder, a FIFO that would block a read, a link) is no lock of ours: refused, not read."""
    try:
        info = os.lstat(lock)
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"'{lock}' is not an imagic lock file (it is {kind(info.st_mode)}): remove it, or "
                              "choose another --out")
        with open(lock, "rb") as handle:
            text = handle.read(32).strip()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise OutputError(f"cannot read the lock '{lock}': {_describe(error)}") from None
    if not text:
        return 0 if time.time() - info.st_mtime < _EMPTY_LOCK_GRACE_S else None  # 0: being written right now
    pid = int(text) if text.isdigit() else -1  # bytes: ASCII digits only
    return pid if pid > 0 and pid_alive(pid) else None


def _take_over(lock: Path) -> None:
    """Remove a stale lock; renamed first, so that of two runs breaking it only one removes it."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _holder(aside) is None:
        aside.unlink(missing_ok=True)
    else:  # another run took it over between our look and our rename: give it back
        os.rename(aside, lock)


@contextlib.contextmanager
def claim(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`'s lock (LOCK_NAME, the same whatever file a command names) for this run, creating the folder;
    a folder another run holds is refused.

    On exit the lock is removed, and so are the folders this claim created if they stayed empty.
    """
    folder = Path(folder)
    created = make_folder(folder)
    lock = folder / LOCK_NAME
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pid = _holder(lock)
            if pid is not None:
                who = f"another imagic run (pid {pid})" if pid else "another imagic run"
                raise OutputExistsError(
                    f"{who} is writing to '{folder}': wait for it or choose another --out "
                    f"(if no run is, delete '{lock}')"
                ) from None
            _take_over(lock)
        except OSError as error:
            _remove_empty(created)
            raise OutputError(f"cannot write to '{folder}': {_describe(error)}") from None
    else:
        raise OutputExistsError(f"cannot claim '{folder}': its lock '{lock}' keeps changing; try again")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        remove_left_by_dead_runs(folder)
        yield folder
    finally:
        lock.unlink(missing_ok=True)
        _remove_empty(created)


def remove_left_by_dead_runs(folder: Path) -> None:
    """Remove the temporary files that killed runs left in `folder` and its subfolders (a SIGKILL skips every
    cleanup); those of live processes are kept."""
    for path in (*folder.glob(".imagic-*"), *folder.glob("*/.imagic-*")):
        match = _LEFT_BY_RUNS.fullmatch(path.name)
        if match and not pid_alive(int(match.group(1) or match.group(2))):
            try:
                os.unlink(path)
            except OSError:
                pass  # gone already, or not ours to remove: it harms nothing


def _remove_empty(folders: list[Path]) -> None:
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): keep it and its parents


def check_outputs_free(paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """Refuse, before any long work starts, to replace an existing file unless asked to."""
    if overwrite:
        return
    for path in paths:
        if _exists(Path(path)):
            raise OutputExistsError(f"'{path}' already exists: pass --overwrite to replace it, or choose another --out")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write(temporary_path)`, then rename the result to `path`: readers see all of it or nothing.

    Without `overwrite` an existing `path` is never replaced, even one created while `write` ran.
    """
    path = Path(path)
    check_outputs_free([path], overwrite)
    make_folder(path.parent)
    # A short name of its own: the final name may already be as long as the file system allows.
    temporary = path.with_name(f".imagic-{os.getpid()}-{next(_temp_names)}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        if overwrite:
            os.replace(temporary, path)
        else:
            _place_new(temporary, path)
    except OSError as error:
        raise OutputError(f"cannot write '{path}': {_describe(error)}") from None
    except SafetensorError as error:  # safetensors reports a full disk or a file-size limit as its own error
        reason = str(error).partition("I/O error: ")[2]
        if not reason:
            raise
        raise OutputError(f"cannot write '{path}': {reason}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _place_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` unless that name exists (link fails if it does, atomically)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise OutputExistsError(f"'{path}' already exists: pass --overwrite to replace it, or choose another --out") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        check_outputs_free([path], False)  # a file system without hard links: check, then rename
        os.replace(temporary, path)
