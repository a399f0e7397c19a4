"""``m.forward`` of a compiled model: its forward, showing the signature of the original model's forward.

Tools read a model's forward signature: ``transformers.Trainer`` keeps the dataset columns it names and
passes loss keywords only when it takes ``**kwargs``. On the class, ``CompiledModel.forward`` is the plain
``(self, *args, **kwargs)`` function; on an instance it carries ``model.forward_signature``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


class BoundForward:
    """``m.forward`` of one compiled model: its forward, showing the original model's signature (tools such as
    ``transformers.Trainer`` read it to pick the batch's columns)."""

    __slots__ = ("model",)

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model._forward(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return self.model.forward_signature


class SignedForward:
    """``CompiledModel.forward``: the plain function on the class, ``BoundForward`` on an instance."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self.function if instance is None else BoundForward(instance)
