"""What graphopt reports while it works: the ``graphopt`` logger, and timing of the compile stages.

Capture, applying the methods, tracing the training step and compiling it report what they did and how
long it took at level INFO, so a compile of minutes is never silent. Unless logging is configured
otherwise, the messages go to stderr; ``graphopt.set_verbosity("warning")`` (or the environment variable
``GRAPHOPT_VERBOSITY=warning``) silences them, ``"debug"`` shows more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger("graphopt")


def set_verbosity(level: str | int) -> None:
    """Set the level of graphopt's messages: ``"debug"``, ``"info"`` (default), ``"warning"``, ``"error"``."""
    logger.setLevel(level.upper() if isinstance(level, str) else level)


def _install_default_handler() -> None:
    """A stderr handler for graphopt's messages when the application configured none of its own."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphopt: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    set_verbosity(os.environ.get("GRAPHOPT_VERBOSITY", "info"))


_install_default_handler()


@contextlib.contextmanager
def stage(what: str, announce: bool = False) -> Iterator[None]:
    """Log ``what`` and the seconds it took when the block ends (and, with ``announce``, when it starts)."""
    if announce:
        logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s: %.2f s", what, time.perf_counter() - start)
