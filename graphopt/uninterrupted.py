"""Ctrl-C between, never inside, a change: ``with uninterrupted(): ...`` defers ``KeyboardInterrupt``.

A training step writes every parameter and optimizer slot in place, and a checkpoint load copies tensor by
tensor; a ``KeyboardInterrupt`` delivered halfway would leave some tensors at the new values and some at the
old. Inside the block, SIGINT is only recorded; when the block ends, the interrupt is raised — after the
change is complete. Outside the main thread (where Python delivers no signals) and when SIGINT is not
Python's default handler (a user's own handler is theirs to keep), the block runs unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """See the module docstring."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
