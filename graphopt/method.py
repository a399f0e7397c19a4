"""The :class:`Method` base class every graphopt method (built-in or third-party) derives from.

A method is its options plus one entry point. Options are keyword parameters of ``__init__`` with type
hints and defaults, stored as attributes of the same name; graphopt reads them to validate specs, list
them in ``graphopt methods`` and build ``MethodInfo``, and rebuilds a fresh method from them for each
compiled model. Range checks belong in ``__init__`` and use :meth:`Method.check`, which raises the
``OptionError`` that names the method, the option and what is allowed.

The entry point is :meth:`Method.apply`: it rewrites the forward graph in place and records everything
else the method contributes through the :class:`~graphopt.context.MethodContext` bound to it. That
class documents the whole contract, phase by phase.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from graphopt.errors import OptionError

if TYPE_CHECKING:
    from graphopt.context import MethodContext

Stage = Literal["forward", "training"]
STAGES: tuple[str, ...] = ("forward", "training")
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """One option of a method: its name, type hint (as text) and default (``REQUIRED`` when none)."""

    name: str
    type: str
    default: Any

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def __str__(self) -> str:
        return self.name if self.required else f"{self.name}={self.default!r}"


@dataclass(frozen=True)
class MethodInfo:
    """What ``graphopt.list_methods()`` tells of a registered method."""

    name: str
    stage: str
    plugin: str
    options: tuple[Option, ...]
    doc: str
    cls: type[Method]


class Method:
    """Base class of a graphopt method: options (``__init__`` keywords) plus :meth:`apply`.

    ``name``: the spec name (may contain ``-``). ``stage``: when ``apply`` runs. Every ``"forward"`` method
    runs first, in the order the user listed them, on the captured forward graph; then the base weights are
    frozen if any method added parameters; then every ``"training"`` method runs, on the final forward
    graph, seeing which parameters train. ``example``: options that make a working instance on a small
    model (graphopt's contract tests use them; needed only when an option has no default).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "forward"
    example: ClassVar[Mapping[str, Any]] = {}

    # -- options -----------------------------------------------------------------------------
    @classmethod
    def options(cls) -> tuple[Option, ...]:
        """The options this method accepts, read from ``__init__``'s signature."""
        if cls.__init__ is object.__init__:
            return ()
        hints = typing.get_type_hints(cls.__init__)
        result = []
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            hint = hints.get(param.name, Any)
            result.append(Option(param.name, _type_name(hint), param.default))
        return tuple(result)

    @classmethod
    def create(cls, options: Mapping[str, Any]) -> Method:
        """Validate ``options`` against the signature and build the method; errors are ``OptionError``."""
        known = {opt.name: opt for opt in cls.options()}
        for key in options:
            if key not in known:
                allowed = ", ".join(str(o) for o in known.values()) or "none"
                raise OptionError(f"method {cls.name!r} has no option {key!r}; its options are: {allowed}")
        missing = [o.name for o in known.values() if o.required and o.name not in options]
        if missing:
            raise OptionError(
                f"method {cls.name!r} needs option {missing[0]!r}, e.g. \"{cls.name}({missing[0]}=...)\""
            )
        hints = typing.get_type_hints(cls.__init__)
        for key, value in options.items():
            hint = hints.get(key, Any)
            if not _matches(value, hint):
                raise OptionError(
                    f"method {cls.name!r}: option {key!r} must be {_type_name(hint)}, got {value!r}"
                )
            if not _finite(value):
                raise OptionError(f"method {cls.name!r}: option {key}={value!r} is invalid; use finite numbers "
                                  "(no nan or inf)")
        try:
            return cls(**options)
        except OptionError:
            raise
        except (TypeError, ValueError) as err:
            raise OptionError(f"method {cls.name!r}: {err}") from err

    def configured_options(self) -> dict[str, Any]:
        """The options of this instance, as ``create`` takes them (what rebuilds an equal method)."""
        return {o.name: getattr(self, o.name) for o in self.options() if hasattr(self, o.name)}

    def fresh(self) -> Method:
        """A new, unapplied instance with the same options (one per compiled model)."""
        return type(self).create(self.configured_options())

    def check(self, condition: bool, option: str, allowed: str) -> None:
        """Raise ``OptionError`` naming this method, ``option`` and what is ``allowed`` unless ``condition``."""
        if not condition:
            value = getattr(self, option, None)
            raise OptionError(f"method {self.name!r}: option {option}={value!r} is invalid; {allowed}")

    def spec(self) -> str:
        """The spec string that rebuilds this method (options as given)."""
        parts = [f"{key}={value!r}" for key, value in self.configured_options().items()]
        return f"{self.name}({', '.join(parts)})"

    def __repr__(self) -> str:
        return f"<graphopt method {self.spec()}>"

    # -- the entry point ---------------------------------------------------------------------------
    def apply(self, gm: torch.fx.GraphModule, ctx: MethodContext) -> None:
        """Rewrite ``gm`` (the forward graph) in place and record contributions through ``ctx``.

        See :class:`graphopt.context.MethodContext` for what may be recorded and when each part runs.
        """
        raise NotImplementedError(f"method {self.name!r} does not implement apply(gm, ctx)")


def _finite(value: Any) -> bool:
    """Whether every number in ``value`` (nested in tuples, lists and dicts) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any value"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a literal ``value`` fits the type hint ``hint`` (ints pass for floats, bools never do)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None) or hint is None:
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()) if args else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True
