"""``graphopt.compile(model, methods=[...], capture="dynamo")``: training a model ``torch.export`` cannot
capture (graph breaks, data-dependent Python control flow such as wav2vec2's and Whisper's LayerDrop
``if torch.rand([]) < p:``).

The model (graphopt's own copy) runs through ``torch.compile`` with :class:`~graphopt.dynamo.backend.
GraphoptBackend`, which applies the forward-stage methods to every subgraph. ``m.step`` is forward (the
compiled subgraphs, Python between them), the loss (``loss_fn`` or the model's own ``output.loss``), plus
the methods' loss terms, ``torch.autograd.grad``, then the optimizer method's update of every trainable
parameter and the methods' post-update rules (``sora``'s proximal gate step) with their hyperparameters —
all updates traced (``make_fx``) into one graph, compiled with ``torch.compile(fullgraph=True)`` unless
``backend="eager"``: fused with each other, not with the backward, which the graph breaks split.

What works on this path: every optimizer method, the forward-stage methods (``hra``, ``oftv2``, ``lora``,
``sora`` and its gate step, ``tract``), export (``graphopt.export``: the model is captured again in eval
mode, where training-only control flow is gone, the methods re-applied with the trained adapters). Not on
this path: ``layerdrop`` (its graph variants need the whole model as one graph; an ``OptionError`` says so),
gradient accumulation and the other training-loop options, model functions (``m.prune()``), ``state_dict``
of the optimizer state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from graphopt.dynamo.backend import GraphoptBackend
from graphopt.errors import OptionError
from graphopt.inputs import CallInputs, normalise_dynamic_dims
from graphopt.method import Method
from graphopt.optim import Optimizer
from graphopt.training_options import step_inputs


class DynamoModel(nn.Module):
    """A model trained through ``torch.compile`` with graphopt's backend (see the module docstring)."""

    def __init__(self, model: nn.Module, methods: Iterable[Method], loss_fn: Callable[..., torch.Tensor] | None,
                 backend: str = "inductor") -> None:
        super().__init__()
        self.methods = list(methods)
        refused = [m.name for m in self.methods if m.stage != "forward" and not isinstance(m, Optimizer)]
        if refused:
            raise OptionError(f"capture='dynamo': method(s) {', '.join(map(repr, refused))} are not supported on the "
                              "dynamo path (layer dropping builds graph variants of one whole-model graph); make the "
                              "model capturable by torch.export (capture='export') or leave them out")
        optimizers = [m for m in self.methods if isinstance(m, Optimizer)]
        self.optimizer = optimizers[0] if optimizers else None
        self.model = copy.deepcopy(model)
        self.model_name = type(model).__name__
        self.loss_fn = loss_fn
        compiler = "inductor" if backend == "inductor" else "eager"
        self.graphopt_backend = GraphoptBackend([m for m in self.methods if m.stage == "forward"], compiler,
                                                self.model)
        # its own cache region: dynamo guards an inlined module by its class, so a later model of the same class
        # could otherwise run this model's compiled subgraphs, which call this model's backend (and adapters)
        compiled = torch.compile(self.model, backend=self.graphopt_backend, dynamic=False, isolate_recompiles=True)
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: its parameters are self.model's
        self.backend = backend
        self._update: Any = None  # the traced, compiled update of every trainable parameter
        self.slots: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self.example: CallInputs | None = None
        self._export: Any = None

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.example is None:
            self.example = CallInputs(tuple(args), dict(kwargs))
        output = self._compiled(*args, **kwargs)
        self._freeze_base()
        return output

    def _freeze_base(self) -> None:
        """Once a method added adapters, only they (and the parameters no subgraph has seen yet) train."""
        adapters = {id(p) for p in self.graphopt_backend.parameters()}
        if adapters:
            for param in self.model.parameters():
                if id(param) not in adapters:
                    param.requires_grad_(False)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train, by name: the adapters when any were added, else the model's."""
        adapters = dict(self.graphopt_backend.named_parameters())
        return adapters or {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- the training step ---------------------------------------------------------------------------
    def _contributions(self) -> list[Any]:
        return [captured.contributions for captured in self.graphopt_backend.subgraphs]

    def _hyper(self) -> dict[str, torch.Tensor]:
        lr = self.optimizer.lr if self.optimizer is not None else 0.0
        hyper = {"lr": torch.tensor(float(lr), dtype=torch.float64),
                 "step": torch.tensor(float(self.steps), dtype=torch.float64)}
        for contributions in self._contributions():
            for key, entry in contributions.hyperparameters.items():
                hyper.setdefault(key, torch.tensor(float(entry.fn(self.steps)), dtype=torch.float64))
        return hyper

    def _updates(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                 slots: dict[str, dict[str, torch.Tensor]], hyper: dict[str, torch.Tensor]) -> None:
        """Every parameter's update, then the post-update rules of the parameters they name, in place."""
        with torch.no_grad():
            for name, param in params.items():
                self.optimizer.step_parameter(name, param, grads[name], slots[name], hyper)
            for contributions in self._contributions():
                for entry in contributions.post_updates:
                    for name in entry.params:
                        if name in params:
                            entry.fn(params[name], hyper)

    def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One training step (see the module docstring); returns the loss."""
        if self.optimizer is None:
            raise OptionError("m.step needs an optimizer method (e.g. 'adamw(lr=1e-3)') in methods")
        inputs, target = step_inputs(args, kwargs, self.loss_fn is not None)
        self.train()
        output = self(*inputs.args, **inputs.kwargs)
        loss = self.loss_fn(output, target) if self.loss_fn is not None else output.loss
        params = self.trainable_parameters()
        self.steps += 1
        hyper = self._hyper()
        for contributions in self._contributions():
            for entry in contributions.loss_terms:
                term = entry.fn(params, hyper)
                loss = loss if term is None else loss + term
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
        for name, param in params.items():
            if name not in self.slots:
                self.slots[name] = self.optimizer.state_for(name, param)
        if self._update is None or self._update[0] != list(params):
            from torch.fx.experimental.proxy_tensor import make_fx

            from graphopt.train.tracing import compile_graph

            def updates(params: Any, grads: Any, slots: Any, hyper: Any) -> None:
                self._updates(params, grads, slots, hyper)

            graph = make_fx(updates, tracing_mode="fake")(params, grads, self.slots, hyper)  # every update
            self._update = (list(params), compile_graph(graph, self.backend, "dynamo-path update"))
        with torch.no_grad():
            self._update[1](params, grads, self.slots, hyper)
        self._export = None
        return loss.detach()

    # -- export --------------------------------------------------------------------------------------
    @property
    def captured(self) -> Any:
        """The eval-mode capture ``graphopt.export`` writes: the model captured by ``torch.export`` in eval mode
        (training-only control flow gone), the forward-stage methods applied, their parameters replaced by
        the trained adapters."""
        if self._export is None:
            self._export = self._capture_eval()
        return self._export

    def _capture_eval(self) -> Any:
        from graphopt.capture import capture
        from graphopt.captured import CapturedModel
        from graphopt.errors import ExportError
        from graphopt.rewrite.meta import captured_dynamic_dims
        from graphopt.rewrite.passes import apply_methods
        from graphopt.train.state import TrainState

        if self.example is None:
            raise ExportError("export needs the model to have run once (call m(...) or m.step(...) first)")
        model = copy.deepcopy(self.model).eval()
        try:
            gm = capture(model, self.example, normalise_dynamic_dims(self.example, None))
        except Exception as err:
            raise ExportError(f"cannot export {self.model_name}: its eval-mode forward cannot be captured either "
                              f"({type(err).__name__}: {str(err).splitlines()[0]}); export needs one graph of "
                              "the eval-mode model") from err
        captured = CapturedModel(gm, self.example, captured_dynamic_dims(gm) or {}, TrainState())
        apply_methods(captured, [m.fresh() for m in self.methods if m.stage == "forward"])
        trained = dict(self.graphopt_backend.named_parameters())
        for name in captured.contributions.parameters:
            if name in trained:
                owner, _, attr = name.rpartition(".")
                target = gm.get_submodule(owner) if owner else gm
                target.register_parameter(attr, nn.Parameter(trained[name].detach().clone(), requires_grad=False))
        captured.graph_changed()
        return captured

    def descriptions(self) -> dict[str, str]:
        """What each method recorded about itself, over every subgraph."""
        texts: dict[str, list[str]] = {}
        for captured in self.graphopt_backend.subgraphs:
            for name, text in captured.descriptions().items():
                texts.setdefault(name, []).append(text)
        return {name: "\n".join(parts) for name, parts in texts.items()}
