"""Ctrl-C during training as a request the loop checks, not an exception that may be lost.

A KeyboardInterrupt raised while Python runs a finalizer (a `__del__`, a weakref callback) is
printed as "Exception ignored" and dropped, so training would go on after the user's Ctrl-C.
Inside `ctrl_c_requests()` the first Ctrl-C only sets a flag, which the loop reads between
steps; a second one interrupts at once, as usual. Listeners nest: an inner one (a training
stage) shares the outer one's flag (the whole training), so a Ctrl-C between stages, or on a
stage's last step, is still seen by the next stage.
"""

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_pressed: threading.Event | None = None  # the outermost listener's flag while one is active


@contextmanager
def ctrl_c_requests() -> Iterator[Callable[[], bool]]:
    """Yields a function that tells whether Ctrl-C was pressed since the outermost listener began."""
    global _pressed
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # handlers can only be set from the main thread; KeyboardInterrupt still works
        return
    if _pressed is not None:
        yield _pressed.is_set
        return
    pressed = _pressed = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
        _pressed = None
