"""A model's call inputs: positional and keyword, their signature, and which of their dims are dynamic.

Every call of a compiled model (``m(...)``, ``m.step(...)``, export) is seen as :class:`CallInputs`:
``args`` and ``kwargs``. An input is named by its position (``0``, ``1``, ...) or its keyword
(``"input_ids"``). The graph is captured for one *signature* — the number of positional inputs and the
keywords given — and a call with another signature is an error naming the captured one.

Dynamic dims (``graphopt.compile(..., dynamic_dims=...)``): by default dim 0 (the batch) of every tensor
input, and dim 1 too (the sequence) of integer tensors with two or more dims (token ids, attention
masks). ``dynamic_dims`` overrides that: a sequence with one entry per positional input, or a mapping
from input (position or keyword) to its entry; an entry is a sequence of dim indices (negative ones count
from the end) or None for a static input. Inputs a mapping does not name keep the default. Capture,
the training step, inductor and export keep these dims dynamic; a batch of one may still compile its own
graph (size-1 dims broadcast, so compilers specialise them), which is logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from graphopt.errors import InputError, OptionError

Key = Union[int, str]  # noqa: UP007 - a runtime alias
DynamicDims = Union[Sequence[Union[Sequence[int], None]], Mapping[Key, Union[Sequence[int], None]]]  # noqa: UP007
Dims = dict[Key, tuple[int, ...]]

_ALLOWED = ("use one entry per positional input (a sequence of dim indices, or None for a static input), e.g. "
            "dynamic_dims=[(0, 1)] for (batch, seq) token ids, or a mapping like {'input_ids': (0, 1)}")


@dataclass(frozen=True)
class CallInputs:
    """The positional and keyword inputs of one call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def items(self) -> list[tuple[Key, Any]]:
        """Every input with its key: positions first, then keywords in the order given."""
        return [*enumerate(self.args), *self.kwargs.items()]

    def signature(self) -> tuple[int, tuple[str, ...]]:
        """What the captured graph is specialised to: the number of positional inputs and the keywords."""
        return len(self.args), tuple(sorted(self.kwargs))

    def describe(self, dims: Dims | None = None) -> str:
        """``(float32[*, 64], attention_mask=int64[*, *])`` for error messages: dtype and shape of each input,
        ``*`` for the dims in ``dims`` (dynamic), other values by type."""
        def text(key: Key, value: Any) -> str:
            if not isinstance(value, torch.Tensor):
                return type(value).__name__
            dynamic = (dims or {}).get(key, ())
            shape = ", ".join("*" if d in dynamic else str(n) for d, n in enumerate(value.shape))
            return f"{str(value.dtype).removeprefix('torch.')}[{shape}]"
        parts = [text(i, v) for i, v in enumerate(self.args)] + [f"{k}={text(k, v)}" for k, v in self.kwargs.items()]
        return f"({', '.join(parts)})"

    def map(self, fn: Any) -> CallInputs:
        """``fn(key, value)`` applied to every input."""
        return CallInputs(tuple(fn(i, v) for i, v in enumerate(self.args)),
                          {k: fn(k, v) for k, v in self.kwargs.items()})

    def detached_copy(self) -> CallInputs:
        """Copies of the tensor inputs (checks run on these, never on the caller's tensors)."""
        return self.map(lambda _, v: v.detach().clone() if isinstance(v, torch.Tensor) else v)


def check_call(captured: CallInputs, dims: Dims, call: CallInputs) -> None:
    """An ``InputError`` unless ``call`` fits the graph captured from ``captured`` with dynamic ``dims``: the same
    positional and keyword inputs, tensors of the same dtype and rank, equal sizes on every static dim, and
    equal non-tensor values (they are constants of the graph)."""
    where = f"the model was captured for inputs {captured.describe(dims)} (* = dynamic)"
    if call.signature() != captured.signature():
        raise InputError(f"{where}; this call passes {call.describe()}: give the same positional and keyword "
                         "inputs (a different set needs its own compiled model)")
    expected = dict(captured.items())
    for key, value in call.items():
        want = expected[key]
        if not isinstance(want, torch.Tensor):
            if isinstance(value, torch.Tensor) or value != want:
                raise InputError(f"{where}; input {key!r} is {value!r} here but was captured as the constant "
                                 f"{want!r}")
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != want.dim() or value.dtype != want.dtype:
            raise InputError(f"{where}; input {key!r} is {CallInputs((value,)).describe()[1:-1]} here: pass a tensor "
                             f"of dtype {want.dtype} with {want.dim()} dims")
        for d, (got, size) in enumerate(zip(value.shape, want.shape)):
            if got != size and d not in dims.get(key, ()):
                raise InputError(f"{where}; dim {d} of input {key!r} is {got} here, captured as {size} and static: "
                                 f"compile with dynamic_dims={{{key!r}: {(*dims.get(key, ()), d)}}} to keep it dynamic")


def default_dims(value: Any) -> tuple[int, ...]:
    """The batch dim of a tensor; batch and sequence of an integer tensor with two or more dims."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return ()
    if not value.is_floating_point() and not value.is_complex() and value.dim() >= 2:
        return (0, 1)
    return (0,)


def normalise_dynamic_dims(inputs: CallInputs, dynamic_dims: DynamicDims | None) -> Dims:
    """Per input key, the sorted non-negative dims that are dynamic (inputs with none are left out).

    Anything not of the form in the module docstring is an ``OptionError`` saying what is allowed.
    """
    given: dict[Key, Any] = {}
    if dynamic_dims is not None:
        if isinstance(dynamic_dims, Mapping):
            given = dict(dynamic_dims)
            known = {key for key, _ in inputs.items()}
            unknown = [k for k in given if k not in known]
            if unknown:
                raise OptionError(f"dynamic_dims names input {unknown[0]!r}, which the call does not have; its "
                                  f"inputs are {', '.join(map(repr, known)) or 'none'}")
        elif isinstance(dynamic_dims, (str, bytes)) or not isinstance(dynamic_dims, Sequence):
            raise OptionError(f"dynamic_dims={dynamic_dims!r} is invalid; {_ALLOWED}")
        else:
            if len(dynamic_dims) != len(inputs.args):
                raise OptionError(f"dynamic_dims={dynamic_dims!r} has {len(dynamic_dims)} entries for "
                                  f"{len(inputs.args)} inputs; {_ALLOWED}")
            given = dict(enumerate(dynamic_dims))
    result: Dims = {}
    for key, value in inputs.items():
        dims = _entry(key, value, given[key]) if key in given else default_dims(value)
        if dims:
            result[key] = dims
    return result


def _entry(key: Key, value: Any, dims: Any) -> tuple[int, ...]:
    if dims is None or (isinstance(value, torch.Tensor) and value.dim() == 0 and not dims):
        return ()
    if not isinstance(value, torch.Tensor):
        raise OptionError(f"dynamic_dims[{key!r}]={dims!r}: input {key!r} is a {type(value).__name__}, not a "
                          f"tensor; {_ALLOWED}")
    if isinstance(dims, int) or not isinstance(dims, Sequence) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise OptionError(f"dynamic_dims[{key!r}]={dims!r} is invalid; {_ALLOWED}")
    bad = [d for d in dims if not -value.dim() <= d < value.dim()]
    if bad:
        raise OptionError(f"dynamic_dims[{key!r}]={dims!r}: dim {bad[0]} is out of range for input {key!r} of "
                          f"shape {tuple(value.shape)}; {_ALLOWED}")
    return tuple(sorted({d % value.dim() for d in dims}))


def grown(inputs: CallInputs, dims: Dims) -> CallInputs:
    """``inputs`` one longer along each dim in ``dims`` (the first slice repeated: token ids stay valid)."""
    def grow(key: Key, value: Any) -> Any:
        for d in dims.get(key, ()):
            value = torch.cat([value, value.narrow(d, 0, 1)], dim=d)
        return value
    return inputs.map(grow)


def at_least_two(inputs: CallInputs, dims: Dims) -> CallInputs:
    """``inputs`` with every dynamic dim of size 0 or 1 grown to 2 (rows repeated), for capture: a size-1
    example would make ``torch.export`` specialise the dim. Sizes of 0 cannot be grown and stay."""
    def grow(key: Key, value: Any) -> Any:
        for d in dims.get(key, ()):
            if value.shape[d] == 1:
                value = torch.cat([value, value], dim=d)
        return value
    return inputs.map(grow)
