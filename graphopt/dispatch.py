"""The one dispatcher: every call of method code goes through :func:`dispatch`.

It binds the method's context to the phase it runs in (a context refuses what its phase does not allow,
see :class:`graphopt.context.MethodContext`) and turns any exception into a graphopt error that names the
method, its plugin and the phase, so a failure inside a third-party method reads
``method 'ia3' (plugin 'graphopt-ia3') failed in phase 'export' (export pass, merge=True): KeyError: ...``.

``OptionError`` (bad options, found while applying) passes unchanged: it already names the method and the
option. ``KeyboardInterrupt`` and other ``BaseException`` pass unchanged too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from graphopt.errors import (
    CheckpointError,
    ExportError,
    GraphoptError,
    MethodError,
    OptionError,
    RewriteError,
    StepError,
)

if TYPE_CHECKING:
    from graphopt.context import MethodContext

Result = TypeVar("Result")

APPLY, STEP, INFERENCE, EXPORT, STATE, FUNCTION = "apply", "step", "inference", "export", "state", "function"
PHASE_ERRORS: dict[str, type[GraphoptError]] = {
    APPLY: RewriteError,      # Method.apply at capture, and the graph check after it
    STEP: StepError,          # hyperparameters, step variants, loss terms, update rules, post-update rules
    INFERENCE: RewriteError,  # inference passes (m.eval(), export)
    EXPORT: ExportError,      # export passes (merge=True / merge=False)
    STATE: CheckpointError,   # method state saved with / loaded from a state dict
    FUNCTION: MethodError,    # functions a method added to the compiled model
}


def method_error(ctx: MethodContext, phase: str, message: str) -> GraphoptError:
    """The error of ``phase`` for ``ctx``'s method, its message prefixed with the method and its plugin."""
    error = PHASE_ERRORS[phase](f"method {ctx.method.name!r} (plugin {ctx.plugin!r}) {message}")
    error.method, error.plugin, error.phase = ctx.method.name, ctx.plugin, phase
    return error


@contextlib.contextmanager
def bound(ctx: MethodContext, phase: str) -> Iterator[None]:
    """Bind ``ctx`` to ``phase`` for the duration of the block (nested binds restore the outer phase)."""
    previous = ctx.phase
    ctx.phase = phase
    try:
        yield
    finally:
        ctx.phase = previous


def dispatch(ctx: MethodContext, phase: str, what: str, fn: Callable[..., Result], *args: Any,
             **kwargs: Any) -> Result:
    """Call method code ``fn(*args, **kwargs)`` for ``ctx``'s method in ``phase``; ``what`` names the call."""
    with bound(ctx, phase):
        try:
            return fn(*args, **kwargs)
        except OptionError:
            raise
        except Exception as err:
            if isinstance(err, GraphoptError) and err.method == ctx.method.name:
                raise  # already named (a nested dispatch of the same method)
            raise method_error(ctx, phase, f"failed in phase {phase!r} ({what}): {type(err).__name__}: {err}") \
                from err
