"""Method specs: ``"name"``, ``"name(k=v, ...)"`` or ``(name, {k: v})``, parsed without evaluating code."""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Union

from graphopt.errors import OptionError
from graphopt.method import Method
from graphopt.plugins import disabled_method_plugin

MethodSpec = Union[str, tuple[str, Mapping[str, Any]], Method]  # noqa: UP007 - a runtime alias


_NAME = re.compile(r"[A-Za-z_][\w.-]*")
_FORM = "write it as \"name\" or \"name(option=value, ...)\""


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name(k=v, ...)"`` into the name and its options; values must be Python literals.

    The grammar is ``name`` or ``name(k=literal, ...)`` and nothing after it. Names may contain ``-`` and
    ``.`` (``"my-method"``); the options are parsed with ``ast`` as the keywords of one call of ``name`` and
    each value with ``ast.literal_eval``: nothing is evaluated. Linear in the length of the spec.
    """
    text = spec.strip()
    name, paren, rest = text.partition("(")
    name = name.rstrip()
    if not _NAME.fullmatch(name) or (paren and not rest.endswith(")")):
        raise OptionError(f"cannot parse method spec {spec!r}; {_FORM}")
    if not paren or not rest[:-1].strip():
        return name, {}
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
    except SyntaxError as err:
        raise OptionError(f"cannot parse method spec {spec!r}: {err.msg}; {_FORM}") from err
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise OptionError(f"cannot parse method spec {spec!r}: one option list, nothing after it; {_FORM}")
    if call.args:
        raise OptionError(f"method spec {spec!r}: options must be given by name, e.g. \"{name}(lr=0.1)\"")
    options: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise OptionError(f"method spec {spec!r}: '**' is not allowed; list the options by name")
        if keyword.arg in options:
            raise OptionError(f"method spec {spec!r}: option {keyword.arg!r} is given twice")
        try:
            options[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError as err:
            raise OptionError(
                f"method {name!r}: option {keyword.arg!r} must be a literal (number, string, tuple, list, dict, "
                f"True/False/None), got {ast.unparse(keyword.value)!r}"
            ) from err
    return name, options


def normalise_spec(spec: MethodSpec) -> tuple[str, dict[str, Any]]:
    """Any accepted spec form as ``(name, options)``."""
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0], dict(spec[1])
    raise OptionError(f"bad method spec {spec!r}: use \"name\", \"name(k=v, ...)\" or (name, {{k: v}})")


def resolve_methods(specs: Iterable[MethodSpec], registry: Mapping[str, type[Method]]) -> list[Method]:
    """Build validated method instances from specs, looking names up in ``registry``."""
    if specs is None or not isinstance(specs, (str, tuple, list, Method)):
        raise OptionError(f"methods={specs!r} is invalid; give a list of method specs, e.g. methods=['hra(r=8)', "
                          "'adamw(lr=1e-3)'] (or [] for none)")
    if isinstance(specs, (str, Method)) or (isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[0], str)
                                             and isinstance(specs[1], Mapping)):
        specs = [specs]  # one spec rather than a sequence of them
    methods: list[Method] = []
    for spec in specs:
        if isinstance(spec, Method):
            methods.append(spec)
            continue
        name, options = normalise_spec(spec)
        if name not in registry:
            blocked = disabled_method_plugin(name)
            if blocked is not None:
                raise OptionError(f"method {name!r} comes from plugin {blocked!r}, which GRAPHOPT_DISABLE_PLUGINS "
                                  f"disables; remove {blocked!r} from GRAPHOPT_DISABLE_PLUGINS to use it")
            close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise OptionError(
                f"unknown method {name!r}; {hint}known methods: {', '.join(sorted(registry))} "
                "(run `graphopt methods` for their options)"
            )
        methods.append(registry[name].create(options))
    names = [m.name for m in methods]
    for name in names:
        if names.count(name) > 1:
            raise OptionError(f"method {name!r} is listed twice; give it once with all its options")
    return methods
