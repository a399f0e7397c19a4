"""The method contract: what a method may contribute, through the one context bound to it.

A method is its options plus :meth:`graphopt.Method.apply` ``(gm, ctx)``. ``apply`` runs once, at capture
(every ``"forward"``-stage method first, in the order given; then base weights are frozen if parameters were
added; then every ``"training"``-stage method). It may rewrite ``gm``, the captured forward graph, in place;
everything else it *records* on ``ctx``, a :class:`MethodContext` bound to it. Each pipeline phase reads only
its own list of contributions and calls them through :func:`graphopt.dispatch.dispatch`, so an error in
method code names the method, its plugin and the phase. This is the whole contract (the built-ins using each
part in brackets):

Phase ``apply``: once, at capture, on the forward graph ``gm``, which ``apply`` may change in place.
    ``apply(gm, ctx)``                       the method's own rewrite of ``gm``                  [every method]
    ``add_parameter(path, name, value)``     a new parameter ``<path>.<method>_<name>``     [hra oftv2 lora sora]
Phase ``step``: when the training step is built and traced, or before each step runs.
    ``set_optimizer(rule)``                  ``rule.init_state`` at a parameter's first step; ``rule.update``
                                             traced per parameter, changing it and its slots   [sgd adamw muon]
    ``add_loss_term(fn)``                    ``fn(params, hyper)`` traced and added to the loss  [hra]
    ``add_post_update(params, fn)``          ``fn(param, hyper)`` traced right after each listed
                                             parameter's update, changing it in place           [sora]
    ``add_hyperparameter(name, schedule)``   ``schedule(step)`` before each step, read in the
                                             graph as ``hyper["<method>.<name>"]``              [sora]
    ``add_step_variants(choose, build)``     ``choose(step)`` before each step; ``build(gm, variant)``
                                             once per uncached variant and input shapes, on a
                                             copy of the forward graph it returns              [layerdrop]
    ``add_training_pass(fn)``                ``fn(gm)`` on the copy of the forward graph a step is
                                             traced from (shares the parameters: nodes only): a
                                             form of the method's nodes that trains faster      [hra]
Phase ``inference``: when ``m.eval()`` or export first needs the inference graph.
    ``add_inference_pass(fn)``               ``fn(gm)`` on the inference graph, which shares the
                                             parameters: nodes only, never parameters            [layerdrop oftv2]
Phase ``export``: at each ``graphopt.export``.
    ``add_export_pass(fn, merge=)``          ``fn(gm)`` on export's own deep copy: nodes and
                                             parameters (``merge=True`` folds, ``False``
                                             leaves the compact form)                     [hra oftv2 lora sora tract]
    ``add_onnx_translation(op, fn)``         called by the ONNX exporter for the custom ``op``   [tract]
Phase ``state``: ``m.state_dict()`` and ``m.load_state_dict()``.
    ``add_state(save, load)``                ``save()`` → ``_graphopt.method.<method>.<key>``;
                                             ``load(state)`` restores the method's own state     [layerdrop]
Phase ``show``: ``graphopt show`` and ``m.descriptions()`` print what was recorded.
    ``add_description(text)``                what the method found or did                        [hra tract layerdrop]
Phase ``function``: ``m.<name>(...)``, which returns the model when ``fn`` returns None.
    ``add_model_function(name, fn)``         ``fn`` may change the model only through
                                             ``replace_parameter``, ``remove_parameter`` and
                                             ``graph_changed``                                   [sora layerdrop]

``hyper`` maps ``"lr"`` (the current learning rate), ``"step"`` (the 1-based step) and every recorded
hyperparameter to a 0-d float64 tensor; ``params`` maps each parameter trained in this step to its tensor.
Recording is allowed only while ``apply`` runs and mutation only inside a model function: the context
refuses anything else, so what a method may touch is exactly what this class offers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from graphopt.contributions import Entry, PostUpdateEntry, StateEntry, VariantEntry
from graphopt.dispatch import APPLY, FUNCTION, STATE
from graphopt.errors import GraphoptError
from graphopt.inputs import CallInputs
from graphopt.plugins import plugin_of
from graphopt.rewrite.layers import DEFAULT_KINDS, LayerCall, layer_calls, select_layers

if TYPE_CHECKING:
    from graphopt.captured import CapturedModel
    from graphopt.contributions import BuildVariant, ChooseVariant, GraphPass, LossTerm, PostUpdate, Schedule
    from graphopt.method import Method
    from graphopt.optim import Optimizer


class MethodContext:
    """The context bound to one method of one compiled model: what it may read, record and change."""

    def __init__(self, method: Method, captured: CapturedModel) -> None:
        self.method = method
        self.plugin = plugin_of(method)
        self.phase: str | None = None  # set by graphopt.dispatch while method code runs
        self._captured = captured
        self._contributions = captured.contributions

    def __repr__(self) -> str:
        return f"<graphopt.MethodContext of {self.method.name!r} (plugin {self.plugin!r})>"

    # -- reading (any phase) -------------------------------------------------------------------------
    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The forward graph (the one ``apply`` received), as it is now."""
        return self._captured.gm

    @property
    def example_inputs(self) -> CallInputs:
        """Copies of the inputs the model was captured with (``.args``, ``.kwargs``)."""
        return self._captured.example

    def layers(self, kinds: Iterable[str] = DEFAULT_KINDS) -> list[LayerCall]:
        """The linear/conv calls of the forward graph in execution order (see ``graphopt.rewrite.layers``)."""
        return layer_calls(self.graph_module, kinds)

    def select(self, targets: str | Iterable[str] | None, kinds: Iterable[str] = ("linear", "addmm"),
               what: str = "linear") -> list[LayerCall]:
        """The layers of ``kinds`` whose module path matches a glob in ``targets`` (all when None); a pattern
        matching nothing is an ``OptionError`` listing the layers there are."""
        return select_layers(self.layers(kinds), targets, self.method.name, what)

    def parameter(self, qualified: str) -> torch.Tensor:
        """The forward graph's parameter (or buffer) ``qualified``."""
        owner, _, name = qualified.rpartition(".")
        return getattr(self.graph_module.get_submodule(owner) if owner else self.graph_module, name)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters that train, by name (after the forward stage: adapters only when any were added)."""
        return {n: p for n, p in self.graph_module.named_parameters() if p.requires_grad}

    # -- apply: the forward graph --------------------------------------------------------------------
    def add_parameter(self, path: str, name: str, value: torch.Tensor, *, trainable: bool = True,
                      dtype: torch.dtype | None = None) -> str:
        """Register ``value`` as parameter ``<path>.<method>_<name>`` of the forward graph; returns that name.

        A floating ``value`` takes ``dtype``, by default the dtype and device of the module's ``weight`` (a
        float64 model gets float64 adapters). When any method adds a trainable parameter, every parameter
        no method added is frozen after the forward stage.
        """
        self._require(APPLY, "add_parameter")
        gm = self.graph_module
        attr = f"{self.method.name}_{name}"
        owner = gm.get_submodule(path) if path else gm
        if hasattr(owner, attr):
            raise GraphoptError(f"{path}.{attr} exists already: was {self.method.name!r} applied twice to {path!r}?")
        weight = getattr(owner, "weight", None)
        if value.is_floating_point():
            if dtype is None and isinstance(weight, torch.Tensor) and weight.is_floating_point():
                dtype = weight.dtype
            value = value.to(dtype=dtype or value.dtype,
                             device=weight.device if isinstance(weight, torch.Tensor) else value.device)
        owner.register_parameter(attr, torch.nn.Parameter(value.detach().clone(), requires_grad=trainable))
        qualified = f"{path}.{attr}" if path else attr
        if trainable:
            self._contributions.parameters[qualified] = self
        return qualified

    def get_attr(self, qualified: str, before: torch.fx.Node) -> torch.fx.Node:
        """A ``get_attr`` node reading ``qualified``, inserted into the forward graph before ``before``."""
        with self.graph_module.graph.inserting_before(before):
            return self.graph_module.graph.get_attr(qualified)

    # -- apply: the training step --------------------------------------------------------------------
    def set_optimizer(self, optimizer: Optimizer) -> None:
        """Make ``optimizer`` (a :class:`graphopt.optim.Optimizer`) the update rule of every trainable parameter."""
        self._require(APPLY, "set_optimizer")
        if self._contributions.optimizer is not None:
            other = self._contributions.optimizer[0].method.name
            raise GraphoptError(f"an optimizer is set already (by {other!r}); use one optimizer method per model")
        self._contributions.optimizer = (self, optimizer)

    def add_loss_term(self, fn: LossTerm) -> None:
        """``fn(params, hyper) -> Tensor | None``, added to the loss inside every training step."""
        self._require(APPLY, "add_loss_term")
        self._contributions.loss_terms.append(Entry(self, fn))

    def add_post_update(self, params: Iterable[str], fn: PostUpdate) -> None:
        """``fn(param, hyper)`` runs in the step graph right after each parameter in ``params`` is updated,
        changing it in place (a proximal step, a projection). With ``sharding="grad_op"``/``"full"``
        (``graphopt.distributed``) ``param`` is this rank's rows of the parameter: the rule must act entry by entry."""
        self._require(APPLY, "add_post_update")
        self._contributions.post_updates.append(PostUpdateEntry(self, frozenset(params), fn))

    def add_hyperparameter(self, name: str, schedule: Schedule) -> str:
        """``schedule(step) -> float`` before each step; the step graph reads it as ``hyper[key]``, the key
        returned (``"<method>.<name>"``). A graph input, so a changing value never recompiles."""
        self._require(APPLY, "add_hyperparameter")
        key = f"{self.method.name}.{name}"
        if key in self._contributions.hyperparameters:
            raise GraphoptError(f"hyperparameter {key!r} is recorded twice")
        self._contributions.hyperparameters[key] = Entry(self, schedule)
        return key

    def add_step_variants(self, choose: ChooseVariant, build: BuildVariant) -> None:
        """Per-step graph variants: ``choose(step)`` names the variant of a step (None: the full graph);
        ``build(gm, variant)`` returns the forward graph of that variant (a copy of ``gm``, never ``gm``
        itself) and the names of the parameters it does not train. The training step caches each built,
        compiled variant per input shapes and calls ``build`` only for one it has not cached."""
        self._require(APPLY, "add_step_variants")
        self._contributions.step_variants.append(VariantEntry(self, choose, build))

    def add_training_pass(self, fn: GraphPass) -> None:
        """``fn(gm)`` edits the graph the training step is traced from (a copy of the forward graph, after
        the step variant's ``build``, sharing the parameters): the method may swap its own nodes for a form
        that computes the same values and gradients faster; the inference and export graphs keep the
        forward graph's form."""
        self._require(APPLY, "add_training_pass")
        self._contributions.training_passes.append(Entry(self, fn))

    # -- apply: inference and export ----------------------------------------------------------------
    def add_inference_pass(self, fn: GraphPass) -> None:
        """``fn(gm)`` edits the inference graph in place (``m.eval()`` and export); it shares the training
        graph's parameters, so it may change nodes, never parameters."""
        self._require(APPLY, "add_inference_pass")
        self._contributions.inference_passes.append(Entry(self, fn))

    def add_export_pass(self, fn: GraphPass, *, merge: bool) -> None:
        """``fn(gm)`` edits export's own copy of the inference graph: ``merge=True`` folds the method into
        plain weights, ``merge=False`` leaves its compact form (e.g. drops inactive ranks)."""
        self._require(APPLY, "add_export_pass")
        self._contributions.export_passes[bool(merge)].append(Entry(self, fn))

    def add_onnx_translation(self, op: Any, fn: Callable[..., Any]) -> None:
        """An onnxscript function for a custom ``op`` the method leaves in the exported graph."""
        self._require(APPLY, "add_onnx_translation")
        self._contributions.onnx_translations[op] = Entry(self, fn)

    # -- apply: state, show, model functions ---------------------------------------------------------
    def add_state(self, save: Callable[[], dict[str, Any]], load: Callable[[Mapping[str, Any]], None],
                  shapes: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> None:
        """Method state saved in ``m.state_dict()`` as ``_graphopt.method.<method>.<key>`` (``save()``) and
        restored from it (``load(state)``, before the model's tensors are loaded; it may resize the method's
        parameters with ``replace_parameter`` / ``remove_parameter``). ``shapes(state)`` then says which shape
        each resized parameter will have (None: removed), so the whole checkpoint is checked before anything
        is loaded."""
        self._require(APPLY, "add_state")
        self._contributions.states.append(StateEntry(self, save, load, shapes))

    def add_description(self, text: str) -> None:
        """What the method found or did, for ``graphopt show`` and ``m.descriptions()``."""
        self._require(APPLY, "add_description")
        self._contributions.descriptions.append((self, str(text)))

    def add_model_function(self, name: str, fn: Callable[..., Any]) -> None:
        """Make ``m.<name>(*args, **kwargs)`` call ``fn(*args, **kwargs)``; a ``None`` result returns the
        model (for chaining). ``fn`` may change the model only through the mutation methods below."""
        self._require(APPLY, "add_model_function")
        functions = self._contributions.functions
        if not name.isidentifier() or name.startswith("_") or name in self._captured.reserved_names:
            raise GraphoptError(f"model function name {name!r} is not allowed: use a public identifier the "
                                "compiled model does not define")
        if name in functions:
            raise GraphoptError(f"model function {name!r} is added by {functions[name].ctx.method.name!r} already")
        functions[name] = Entry(self, fn)

    # -- function: mutation --------------------------------------------------------------------------
    def replace_parameter(self, qualified: str, value: torch.Tensor,
                          slots: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Replace parameter ``qualified`` by ``value`` (same ``requires_grad``). Its optimizer slots of the old
        parameter's shape become ``slots(slot)`` (e.g. the same rows selected); without ``slots`` its
        optimizer state is dropped and starts afresh at the next step. Compiled graphs are rebuilt."""
        self._require((FUNCTION, STATE), "replace_parameter")
        old = self.parameter(qualified)
        owner, _, attr = qualified.rpartition(".")
        module = self.graph_module.get_submodule(owner) if owner else self.graph_module
        setattr(module, attr, torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        self._captured.map_slots(qualified, tuple(old.shape), slots)
        self._captured.graph_changed()

    def remove_parameter(self, qualified: str) -> None:
        """Delete parameter ``qualified`` with its optimizer state; no node may read it any more."""
        self._require((FUNCTION, STATE), "remove_parameter")
        readers = [n.name for n in self.graph_module.graph.nodes if n.op == "get_attr" and n.target == qualified]
        if readers:
            raise GraphoptError(f"cannot remove parameter {qualified!r}: nodes {', '.join(readers)} still read it")
        owner, _, attr = qualified.rpartition(".")
        delattr(self.graph_module.get_submodule(owner) if owner else self.graph_module, attr)
        self._contributions.parameters.pop(qualified, None)
        self._captured.map_slots(qualified, None, None)
        self._captured.graph_changed()

    def graph_changed(self) -> None:
        """Say the forward graph was edited: it is checked, and compiled graphs are rebuilt on next use."""
        self._require((FUNCTION, STATE), "graph_changed")
        self._captured.graph_changed()

    # -- phase checks --------------------------------------------------------------------------------
    def _require(self, phases: str | tuple[str, ...], what: str) -> None:
        allowed = (phases,) if isinstance(phases, str) else phases
        if self.phase not in allowed:
            when = " or ".join({APPLY: "inside the method's apply(gm, ctx)", FUNCTION: "inside a model function",
                                STATE: "while its state loads"}[p] for p in allowed)
            raise GraphoptError(f"ctx.{what} may only be called {when} (called in phase {self.phase!r})")

