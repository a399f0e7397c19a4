"""Exceptions raised by graphopt; each message names the problem and the fix.

Errors from method code carry the method, its plugin and the phase (see :mod:`graphopt.dispatch`) in
their message and as the attributes ``method``, ``plugin`` and ``phase`` (None for the core's own errors).
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of graphopt's own errors."""

    method: str | None = None
    plugin: str | None = None
    phase: str | None = None


class OptionError(GraphoptError, ValueError):
    """A method spec, an option or an argument is invalid (unknown method, unknown option, bad value)."""


class InputError(GraphoptError, ValueError):
    """A call's inputs do not fit the captured graph (other inputs, another dtype or rank, a static dim changed)."""


class PluginError(GraphoptError, RuntimeError):
    """A plugin failed while registering or two plugins clash."""


class CaptureError(GraphoptError, RuntimeError):
    """Neither capture path could turn the model into a graph."""


class NotCapturedError(GraphoptError, RuntimeError):
    """What needs the captured graph was asked for before the model was captured (it is, on its first call)."""


class RewriteError(GraphoptError, RuntimeError):
    """A method failed to apply, or left a forward or inference graph that does not run."""


class StepError(GraphoptError, RuntimeError):
    """Building or running the training step failed in method code (loss term, update rule, variant, ...)."""


class CheckpointError(GraphoptError, ValueError):
    """A state dict does not fit the compiled model, or a method failed to save or load its state."""


class MethodError(GraphoptError, RuntimeError):
    """A function a method added to the compiled model (``m.prune()``) failed."""


class ExportError(GraphoptError, RuntimeError):
    """An exported file could not be written or does not match the PyTorch model."""
