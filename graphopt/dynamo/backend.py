"""``graphopt.backend(methods=[...])``: a ``torch.compile`` backend that applies graphopt's forward-stage
methods to every subgraph dynamo captures.

``torch.compile`` splits a model with graph breaks (data-dependent Python control flow such as
``if torch.rand([]) < p:``, unsupported calls) into subgraphs and hands each to its backend, with the
parameters as graph inputs. For each subgraph this backend:

1. names every parameter and buffer input — by the model's own ``named_parameters()`` when the backend
   knows the model (``graphopt.backend(methods, model=model)``, and always under ``graphopt.compile(...,
   capture="dynamo")``), else from dynamo's source (``L['self']._modules['fc']._parameters['weight']`` →
   ``fc.weight``, relative to the module whose frame was compiled);
2. re-traces the subgraph with ``torch.export`` into graphopt's form (aten ops, parameters as attributes
   under those names, the same tensors), and normalises it (:mod:`graphopt.rewrite.normalise`);
3. applies the forward-stage methods (``hra``, ``oftv2``, ``lora``, ``sora``, ``tract``, third-party
   adapters) exactly as on a ``torch.export`` capture (a subgraph without any of a method's layers is
   left to the others). Their parameters are kept by name across
   subgraphs and recompiles: a layer seen again (a new input shape, a guard that failed) reuses its
   trained adapter;
4. runs the rewritten graph eagerly (``compiler="eager"``) or compiles it with inductor.

What works on this path: forward-stage methods, with their export folds (through ``graphopt.compile(...,
capture="dynamo")``). Not here: optimizers and training-stage methods (``layerdrop``) need graphopt's
training step — use ``graphopt.compile(..., capture="dynamo")``, which fuses the optimizer (layer dropping
needs one whole graph: not on the dynamo path) — and the contributions a method records for the training
step (``sora``'s proximal gate step, ``hra``'s ``reg_lambda``) run only there too. Adding adapters freezes the
other parameters of the model compiled (as ``graphopt.compile`` does on its copy); train
``backend.parameters()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from graphopt.errors import GraphoptError, OptionError
from graphopt.method import Method
from graphopt.rewrite.normalise import normalise

_SOURCE_TOKENS = re.compile(r"\.(\w+)|\['([^']+)'\]|\[(\d+)\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}
_NOTHING_HERE = re.compile(r"has no .*layer|matches no .*layer")


def source_name(source: str) -> str:
    """``L['self']._modules['fc']._parameters['weight']`` → ``fc.weight`` (the part after the root local)."""
    root = re.match(r"^\w+\['[^']+'\]", source)
    rest = source[root.end():] if root else source
    parts = [a or b or c for a, b, c in _SOURCE_TOKENS.findall(rest)]
    return ".".join(p for p in parts if p not in _CONTAINERS)


def _graph_arg(node: torch.fx.Node) -> tuple[str | None, Any]:
    """``(source name, example value)`` of a dynamo placeholder."""
    arg = node.meta.get("grapharg")
    if arg is None:
        return None, None
    name = arg.source.name
    return (name() if callable(name) else name), getattr(arg, "example", None)


class _Subgraph(nn.Module):
    """Dynamo's subgraph as a module: its parameter and buffer inputs registered (the same tensors) under
    their names, its other inputs as ``forward``'s arguments."""

    def __init__(self, dynamo_gm: torch.fx.GraphModule, slots: list[tuple[str, str, torch.Tensor] | None]) -> None:
        super().__init__()
        self.slots = slots  # per dynamo input: (kind, name, tensor) for state, None for a user input
        for kind, name, tensor in (s for s in slots if s is not None):
            owner = self
            *path, attr = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if kind == "parameter":
                owner.register_parameter(attr, tensor)
            else:
                owner.register_buffer(attr, tensor)
        object.__setattr__(self, "dynamo_gm", dynamo_gm)  # not a submodule: its names are dynamo's

    def forward(self, *inputs: Any) -> Any:
        given = iter(inputs)
        args = [next(given) if slot is None else self.get_parameter(slot[1]) if slot[0] == "parameter"
                else self.get_buffer(slot[1]) for slot in self.slots]
        return self.dynamo_gm(*args)


class StaleSubgraphError(GraphoptError):
    """A rewritten subgraph was called with other parameter tensors than the ones it was compiled for."""


class GraphoptBackend:
    """A ``torch.compile`` backend applying ``methods`` (forward stage) to each captured subgraph."""

    def __init__(self, methods: Iterable[Method], compiler: str = "eager", model: nn.Module | None = None) -> None:
        self.methods = list(methods)
        refused = [m.name for m in self.methods if m.stage != "forward"]
        if refused:
            raise OptionError(
                f"graphopt.backend: method(s) {', '.join(map(repr, refused))} are training-stage methods, which need "
                "graphopt's training step; the backend applies forward-stage methods (hra, oftv2, lora, sora, tract, "
                "adapters). Use graphopt.compile(model, methods=[...], capture='dynamo') for optimizers (fused) "
                "or train backend.parameters() with a torch.optim optimizer")
        if compiler not in ("eager", "inductor"):
            raise OptionError(f"graphopt.backend: unknown compiler {compiler!r}; use 'eager' or 'inductor'")
        self.compiler = compiler
        self.names = ({id(t): n for n, t in model.named_parameters(remove_duplicate=False)} |
                      {id(t): n for n, t in model.named_buffers(remove_duplicate=False)}) if model is not None else {}
        self.adapters: dict[str, nn.Parameter] = {}
        self.subgraphs: list[Any] = []  # the CapturedModel of each rewritten subgraph, in compile order
        self.skipped: dict[str, str] = {}  # method -> why it found nothing to rewrite in some subgraph

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the methods added (adapters), one per name across every subgraph."""
        return list(self.adapters.values())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.adapters.items()

    def _slots(self, gm: torch.fx.GraphModule,
               values: list[Any] | None = None) -> list[tuple[str, str, torch.Tensor] | None]:
        """Per dynamo input: ``(kind, name, tensor)`` for a parameter or buffer, None for a user input; the tensors
        are ``values`` (this call's inputs) when given, else dynamo's examples."""
        slots: list[tuple[str, str, torch.Tensor] | None] = []
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            source, value = _graph_arg(node)
            kind = ("parameter" if isinstance(value, nn.Parameter) else
                    "buffer" if source and "_buffers[" in source else None)
            if kind is None or not isinstance(value, torch.Tensor):
                slots.append(None)
                continue
            value = value if values is None else values[i]
            slots.append((kind, self.names.get(id(value)) or source_name(source), value))
        return slots

    def rewrite(self, gm: torch.fx.GraphModule, example_inputs: list[Any],
                values: list[Any] | None = None) -> tuple[torch.fx.GraphModule, list[int]]:
        """Dynamo's subgraph in graphopt's form with the methods applied, holding the parameters and buffers
        of ``values`` (the inputs of one call; default: dynamo's examples); and which dynamo inputs it takes."""
        from graphopt.captured import CapturedModel
        from graphopt.inputs import CallInputs
        from graphopt.rewrite.passes import apply_methods
        from graphopt.train.state import TrainState

        slots = self._slots(gm, values)
        user = [i for i, slot in enumerate(slots) if slot is None]
        inputs = tuple(example_inputs[i] for i in user)
        module = _Subgraph(gm, slots)
        exported = torch.export.export(module, inputs, strict=False).module()
        for kind, name, tensor in (s for s in slots if s is not None):  # the model's own tensors, not copies
            owner, _, attr = name.rpartition(".")
            target = exported.get_submodule(owner) if owner else exported
            if kind == "parameter":
                target.register_parameter(attr, tensor)
            else:
                target.register_buffer(attr, tensor)
        normalise(exported)
        captured = CapturedModel(exported, CallInputs(inputs), {}, TrainState())
        for method in self.methods:
            try:
                apply_methods(captured, [method.fresh()])
            except OptionError as err:  # this subgraph holds none of the method's layers: the next may
                if not _NOTHING_HERE.search(str(err)):
                    raise
                self.skipped.setdefault(method.name, str(err))
        for name in captured.contributions.parameters:
            owner, _, attr = name.rpartition(".")
            target = exported.get_submodule(owner) if owner else exported
            known = self.adapters.get(name)
            if known is not None and known.shape == getattr(target, attr).shape:
                target.register_parameter(attr, known)  # a layer seen before keeps its trained adapter
            else:
                self.adapters[name] = getattr(target, attr)
        self.subgraphs.append(captured)
        return exported, user

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """The compiled subgraph: one rewritten (and, with inductor, compiled) graph per set of parameter and
        buffer tensors it is called with. Dynamo guards a module it inlines by its class, so one cache entry
        serves every instance of a layer class (wav2vec2's two encoder layers), while the rewritten graph holds
        one layer's tensors and adapters: each new set of tensors gets its own graph, named by the model's
        parameter names."""
        slots = self._slots(gm)
        state = [i for i, slot in enumerate(slots) if slot is not None]

        def build(inputs: list[Any], values: list[Any] | None) -> tuple[Any, list[int]]:
            rewritten, user = self.rewrite(gm, inputs, values)
            run: Any = rewritten
            if self.compiler == "inductor":
                from torch._inductor.compile_fx import compile_fx

                run = compile_fx(rewritten, [inputs[i] for i in user])
            return run, user

        variants = {tuple(id(slots[i][2]) for i in state): build(list(example_inputs), None)}

        def call(*args: Any) -> Any:
            key = tuple(id(args[i]) for i in state)
            if key not in variants:
                if not self.names:
                    raise StaleSubgraphError(
                        "graphopt.backend: torch.compile ran one compiled subgraph for the parameters of several "
                        "modules (instances of one class, or parameters replaced after compiling); name them: "
                        "graphopt.backend(methods, model=model)")
                values = list(args)
                variants[key] = build(values, values)
            run, user = variants[key]
            return run(*[args[i] for i in user])

        return call


def backend(methods: Iterable[Any] = (), compiler: str = "eager", model: nn.Module | None = None) -> GraphoptBackend:
    """A ``torch.compile`` backend applying forward-stage ``methods`` (specs, as for ``graphopt.compile``) to
    every subgraph: ``torch.compile(model, backend=graphopt.backend(methods=["lora(r=8)"], model=model))``.
    ``compiler``: ``"eager"`` runs the rewritten subgraphs as they are, ``"inductor"`` compiles them.
    ``model`` (optional) names parameters by ``model.named_parameters()``. See the module docstring for the
    methods that work here."""
    from graphopt.plugins import method_registry
    from graphopt.specs import resolve_methods

    registry = {name: info.cls for name, info in method_registry().items()}
    return GraphoptBackend(resolve_methods(methods, registry), compiler, model)
