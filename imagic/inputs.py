"""Opening the files a user names (images, masks, edit states, batch lists): regular files only.

A FIFO given by mistake would block the first read forever (holding the output folder's lock), a device
would be read without end, and a folder fails deep inside a decoder: each is refused in one line instead.
The file is opened without blocking, so not even the open of a FIFO waits for a writer.
"""

import os
import stat
from typing import BinaryIO

from .errors import ImagicError


def kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a link"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def reason(error: OSError) -> str:
    return error.strerror or str(error)


def open_regular(path: str | os.PathLike, what: str, error: type[ImagicError]) -> BinaryIO:
    """`path` opened for reading in binary if it is a regular file; anything else raises `error` naming `what`."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as problem:  # ValueError: a NUL in the path
        why = reason(problem) if isinstance(problem, OSError) else "its path holds a NUL character"
        raise error(f"cannot read {what} '{path}': {why}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise error(f"cannot read {what} '{path}': it is {kind(mode)}, not a file")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def check_regular(path: str | os.PathLike, what: str, error: type[ImagicError]) -> None:
    """Refuse `path` unless it is a readable regular file (before a library opens it by name)."""
    open_regular(path, what, error).close()


def read_limited(path: str | os.PathLike, what: str, error: type[ImagicError], limit: int) -> bytes:
    """A regular file's bytes, refused when over `limit` bytes (a list or record, never that large)."""
    with open_regular(path, what, error) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} '{path}' is over {limit >> 20} MiB: not what imagic reads")
    return data
