"""Ctrl-C during training as a stop request, on the same channel as any other (`should_stop`).

A KeyboardInterrupt raised while Python runs a finalizer (a `__del__`, a weakref callback) is
printed as "Exception ignored" and dropped, so training would go on after the user's Ctrl-C.
Inside `stopped_by_ctrl_c(should_stop)` the first Ctrl-C only sets a flag, which the training loop
reads between steps through the `should_stop` it yields; a second one interrupts at once, as usual.
"""

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def stopped_by_ctrl_c(should_stop: Callable[[], bool] | None = None) -> Iterator[Callable[[], bool]]:
    """Yields a stop request that is true once Ctrl-C was pressed or `should_stop` says so. Ctrl-C is heard in the
    main thread only (where Python delivers it); elsewhere `should_stop` alone is yielded."""
    if threading.current_thread() is not threading.main_thread():
        yield should_stop or (lambda: False)
        return
    pressed = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield lambda: pressed.is_set() or (should_stop is not None and should_stop())
    finally:
        signal.signal(signal.SIGINT, previous)
