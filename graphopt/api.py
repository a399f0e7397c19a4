"""``graphopt.compile``: wrap a model, or decorate a module class or factory, with graphopt methods."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from graphopt.compiled_model import CompiledModel
from graphopt.errors import OptionError
from graphopt.inputs import CallInputs, DynamicDims
from graphopt.optim import Optimizer
from graphopt.plugins import method_registry
from graphopt.specs import MethodSpec, resolve_methods
from graphopt.training_options import TrainingOptions

BACKENDS = ("inductor", "eager", "aot_eager")


def compile(
    model: nn.Module | type | Callable[..., nn.Module] | None = None,
    *,
    methods: Iterable[MethodSpec] | MethodSpec = (),
    loss_fn: Callable[..., torch.Tensor] | None = None,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    backend: str = "inductor",
    dynamic_dims: DynamicDims | None = None,
    gradient_accumulation_steps: int = 1,
    precision: str = "32",
    on_nonfinite: str | None = None,
    trainable: str | Iterable[str] = (),
    checkpoint_blocks: bool | str | Iterable[str] | None = None,
    process_group: Any = None,
    sharding: str = "none",
    bucket_mb: float = 25,
    sync_buffers: bool = False,
    capture: str = "export",
) -> Any:
    """Rewrite ``model`` with ``methods`` and return a :class:`CompiledModel` (a ``torch.nn.Module``).

    Without ``model`` it returns a decorator for an ``nn.Module`` subclass (instances come back compiled),
    an instance, or a factory function. Specs and options are validated here, before any capture.

    ``loss_fn(output, target)``: the loss of ``m.step`` (without it, the model's own ``output.loss``).
    ``example_inputs``: positional inputs (a tuple) or keyword inputs (a dict) to capture with now; else
    the model is captured on its first call. ``dynamic_dims``: which input dims stay dynamic (default: the
    batch dim of every tensor input and the sequence dim of token tensors; see ``graphopt.inputs``).
    The training-loop options (``gradient_accumulation_steps``, ``precision``, ``on_nonfinite``,
    ``trainable``, ``checkpoint_blocks``) and the data-parallel ones (``process_group``, ``sharding``,
    ``bucket_mb``, ``sync_buffers``) are described in ``graphopt.training_options`` (and ``graphopt.distributed``).
    ``capture="dynamo"``: for a model ``torch.export`` cannot capture (graph breaks, data-dependent Python
    control flow), train it through ``torch.compile`` with graphopt's backend instead; returns a
    :class:`graphopt.dynamo.DynamoModel` (the methods that work there are listed in ``graphopt.dynamo.model``).
    """
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    options = TrainingOptions.create(gradient_accumulation_steps, precision, on_nonfinite, trainable,
                                     checkpoint_blocks, process_group, sharding, bucket_mb, sync_buffers)
    registry = {name: info.cls for name, info in method_registry().items()}
    resolved = resolve_methods(methods, registry)
    optimizers = [m.name for m in resolved if isinstance(m, Optimizer)]
    if len(optimizers) > 1:
        raise OptionError(f"one optimizer method per model, got {', '.join(map(repr, optimizers))}; keep one")
    example = _example(example_inputs)
    if capture not in ("export", "dynamo"):
        raise OptionError(f"unknown capture={capture!r}; use 'export' (torch.export, one graph) or 'dynamo' "
                          "(torch.compile with graphopt's backend, graph breaks allowed)")
    if capture == "dynamo":
        given = {"dynamic_dims": dynamic_dims is not None,
                 "gradient_accumulation_steps": gradient_accumulation_steps != 1, "precision": precision != "32",
                 "on_nonfinite": on_nonfinite is not None, "trainable": bool(trainable),
                 "checkpoint_blocks": bool(checkpoint_blocks), "process_group": process_group is not None}
        if any(given.values()):
            raise OptionError(f"capture='dynamo' does not take {', '.join(k for k, v in given.items() if v)}: the "
                              "training-loop options need graphopt's own training step (capture='export')")
        return _dynamo(model, resolved, loss_fn, backend, example)

    def build(target: nn.Module) -> CompiledModel:
        compiled = CompiledModel(target, [m.fresh() for m in resolved], loss_fn, backend, dynamic_dims, options)
        if example is not None:
            compiled._ensure_captured(example)
        return compiled

    if model is None:
        return lambda target: _wrap(target, build)
    return _wrap(model, build)


def _dynamo(model: Any, methods: list, loss_fn: Callable[..., torch.Tensor] | None, backend: str,
            example: CallInputs | None) -> Any:
    from graphopt.dynamo import DynamoModel

    if not isinstance(model, nn.Module):
        raise OptionError("capture='dynamo' takes an nn.Module instance (not a class, a factory or a decorator use)")
    compiled = DynamoModel(model, [m.fresh() for m in methods], loss_fn, backend)
    if example is not None:
        compiled(*example.args, **example.kwargs)  # compiles now: the adapters exist from here on
    return compiled


def _example(example_inputs: Any) -> CallInputs | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Mapping):
        return CallInputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return CallInputs(tuple(example_inputs))
    raise OptionError(f"example_inputs must be a tuple of positional inputs or a dict of keyword inputs, got "
                      f"{type(example_inputs).__name__} (write example_inputs=(x,) for one input)")


def _wrap(target: Any, build: Callable[[nn.Module], CompiledModel]) -> Any:
    if isinstance(target, nn.Module):
        return build(target)
    if inspect.isclass(target) and issubclass(target, nn.Module):
        @functools.wraps(target, updated=())
        def make_compiled(*args: Any, **kwargs: Any) -> CompiledModel:
            return build(target(*args, **kwargs))
        return make_compiled
    if callable(target):
        @functools.wraps(target)
        def compiled_factory(*args: Any, **kwargs: Any) -> CompiledModel:
            model = target(*args, **kwargs)
            if not isinstance(model, nn.Module):
                raise TypeError(f"{target.__name__} returned {type(model).__name__}, not an nn.Module")
            return build(model)
        return compiled_factory
    raise TypeError(f"graphopt.compile takes an nn.Module, a Module subclass or a factory, got {type(target).__name__}")
