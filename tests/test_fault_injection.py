"""A failure at any point changes nothing: a method or plugin that raises (an error, or ``KeyboardInterrupt``)
in capture, apply, a step, a checkpoint load or an export leaves the user's model, the compiled model, its
optimizer state and any file exactly as they were; a Ctrl-C in the middle of a step or a load lands after it."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from models import MLP

import graphopt

X, Y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])


class Injected(Exception):
    pass


class Fragile(graphopt.Method):
    """A scale on the head's input that breaks where ``fail`` says, with ``kind`` (an error or an interrupt),
    after it has already changed something in that phase."""

    name = "fragile"

    def __init__(self, fail: str = "none", kind: str = "error") -> None:
        self.fail, self.kind = fail, kind

    def _maybe(self, where: str) -> None:
        if self.fail == where:
            raise KeyboardInterrupt if self.kind == "interrupt" else Injected(f"injected in {where}")

    def apply(self, gm, ctx) -> None:
        from graphopt.rewrite.adapters import fold_input_transforms, insert_input_transform

        head = ctx.select("head")[0]
        scale = ctx.add_parameter(head.path, "scale", torch.ones(head.in_features))
        insert_input_transform(ctx, head, torch.mul, [scale])
        self._maybe("apply")  # after the graph has been edited
        ctx.add_post_update([scale], lambda param, hyper: self._maybe("post-update"))
        ctx.add_step_variants(lambda step: "late" if step > 1 else None,
                              lambda g, v: self._maybe("variant graph") or (g, set()))
        def export_pass(g) -> None:
            fold_input_transforms(g, torch.mul, lambda w, s: w * s)
            self._maybe("export")  # after the graph has been folded

        ctx.add_export_pass(export_pass, merge=True)
        self.loaded = 0

        def load(state) -> None:
            self.loaded = state["loaded"]
            if self.loaded:  # loading a new value fails halfway; loading 0 back (the roll-back) works
                self._maybe("state load")

        ctx.add_state(lambda: {"loaded": self.loaded}, load)


class FragilePlugin:
    @graphopt.hookimpl
    def graphopt_register_methods(self, register):
        register(Fragile)


def fragile(fail: str, kind: str, **options) -> graphopt.CompiledModel:
    torch.manual_seed(0)
    return graphopt.compile(MLP(), methods=[("fragile", {"fail": fail, "kind": kind}), "adamw(lr=1e-2)"],
                            loss_fn=F.cross_entropy, backend="eager", **options)


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in module.state_dict().items()}


def same(module: torch.nn.Module, before: dict) -> bool:
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


def expected(kind: str) -> type[BaseException]:
    return KeyboardInterrupt if kind == "interrupt" else graphopt.GraphoptError


KINDS = ["error", "interrupt"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_capture_plugin_that_fails_leaves_the_users_model_and_the_compiled_model(fresh_plugins, kind) -> None:
    class BrokenCapture:
        @graphopt.hookimpl
        def graphopt_capture(self, model, example_inputs):
            model.head.weight.data.zero_()  # on graphopt's copy: the user's model never sees it
            raise KeyboardInterrupt if kind == "interrupt" else Injected("capture failed")

    graphopt.register_plugin(BrokenCapture(), name="broken-capture")
    torch.manual_seed(0)
    model = MLP()
    before = snapshot(model)
    m = graphopt.compile(model, methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager")
    with pytest.raises(KeyboardInterrupt if kind == "interrupt" else graphopt.PluginError):
        m.step(X, Y)
    assert same(model, before) and torch.nn.Module.state_dict(m).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in torch.nn.Module.state_dict(m).items())
    with pytest.raises(graphopt.NotCapturedError):
        _ = m.graph_module  # still uncaptured: the next call captures again


@pytest.mark.parametrize("kind", KINDS)
def test_a_method_that_fails_in_apply_leaves_the_model_uncaptured(fresh_plugins, kind) -> None:
    graphopt.register_plugin(FragilePlugin(), name="fragile-tests")
    torch.manual_seed(0)
    model = MLP()
    before = snapshot(model)
    m = graphopt.compile(model, methods=[("fragile", {"fail": "apply", "kind": kind}), "adamw(lr=1e-2)"],
                         loss_fn=F.cross_entropy, backend="eager")
    with pytest.raises(expected(kind)):
        m(X)
    assert same(model, before) and torch.nn.Module.state_dict(m).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in torch.nn.Module.state_dict(m).items())
    with pytest.raises(graphopt.NotCapturedError):
        _ = m.graph_module


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fail", ["post-update", "variant graph"])
def test_a_step_that_fails_while_it_is_built_changes_nothing(fresh_plugins, fail, kind) -> None:
    graphopt.register_plugin(FragilePlugin(), name="fragile-tests")
    m = fragile(fail if fail == "variant graph" else "none", kind, example_inputs=(X,))
    m.step(X, Y)  # step 1 builds without the fault; the variant graph of step 2 is a new build
    if fail == "post-update":
        m = fragile(fail, kind, example_inputs=(X,))
    before = snapshot(m)
    with pytest.raises(expected(kind)):
        m.step(X, Y)
    assert same(m, before)


def test_ctrl_c_during_a_step_lands_after_the_step_is_complete() -> None:
    def make() -> graphopt.CompiledModel:
        torch.manual_seed(0)
        return graphopt.compile(MLP(), methods=["hra(r=2)", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy,
                                backend="eager", example_inputs=(X,))

    m, reference = make(), make()
    for model in (m, reference):
        model.step(X, Y)
    reference.step(X, Y)
    trainer = m.captured.trainer
    (key, cached), = trainer._cache.items()  # the step graph step 2 will run

    def interrupted_run(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C before the graph writes anything
        return cached.run(*args)

    trainer._cache[key] = cached._replace(run=interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        m.step(X, Y)
    assert m.step_count == 2 and same(m, snapshot(reference))  # the whole step, counters and slots included


@pytest.mark.parametrize("kind", KINDS)
def test_a_method_state_load_that_fails_rolls_every_method_back(fresh_plugins, kind) -> None:
    graphopt.register_plugin(FragilePlugin(), name="fragile-tests")
    m = fragile("state load", kind, example_inputs=(X,))
    source = fragile("none", "error", example_inputs=(X,))
    source.step(X, Y)
    state = source.state_dict()
    state["_graphopt.method.fragile.loaded"] = 7
    m.step(X, Y)
    before = snapshot(m)
    with pytest.raises(graphopt.CheckpointError if kind == "error" else KeyboardInterrupt):
        m.load_state_dict(state)
    assert same(m, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".onnx", ".pt2", ".py"])
def test_an_export_pass_that_fails_writes_nothing(fresh_plugins, tmp_path, kind, suffix) -> None:
    graphopt.register_plugin(FragilePlugin(), name="fragile-tests")
    m = fragile("export", kind, example_inputs=(X,))
    m.step(X, Y)
    before = snapshot(m)
    target = tmp_path / f"model{suffix}"
    target.write_bytes(b"the good file")
    with pytest.raises(graphopt.ExportError if kind == "error" else KeyboardInterrupt):
        graphopt.export(m, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"the good file"
    assert same(m, before)


def test_ctrl_c_while_the_file_is_checked_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    import sys

    torch.manual_seed(0)
    m = graphopt.compile(MLP(), methods=["hra(r=2)"], backend="eager", example_inputs=(X,))
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the good file")

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["graphopt.export"], "_compare", interrupt)
    with pytest.raises(KeyboardInterrupt):
        graphopt.export(m, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == b"the good file"


def test_uninterrupted_defers_ctrl_c_to_the_end_of_the_block() -> None:
    from graphopt.uninterrupted import uninterrupted

    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block ran")
    assert done and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_capture_retried_after_an_interrupt_equals_a_clean_one(fresh_plugins) -> None:
    class InterruptOnce:
        calls = 0

        @graphopt.hookimpl
        def graphopt_after_apply(self, method, graph_module, ctx):
            InterruptOnce.calls += 1
            if InterruptOnce.calls == 1:
                raise KeyboardInterrupt  # after hra recorded its penalty term

    def make() -> graphopt.CompiledModel:
        torch.manual_seed(0)
        return graphopt.compile(MLP(), methods=["hra(r=2, reg_lambda=1.0)", "sgd(lr=0.1)"], loss_fn=F.cross_entropy,
                                backend="eager")

    clean = make()
    graphopt.register_plugin(InterruptOnce(), name="interrupt-once")
    retried = make()
    with pytest.raises(KeyboardInterrupt):
        retried.step(X, Y)
    assert InterruptOnce.calls == 1
    losses = []
    for model in (retried, clean):
        torch.manual_seed(1)  # the adapters' random init at capture draws the same numbers
        losses.append(model.step(X, Y))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)  # the penalty counted once
    assert same(retried, snapshot(clean))
