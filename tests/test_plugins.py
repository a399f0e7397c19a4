"""Plugin discovery through real entry points, duplicates, blocking, run-time registration and every hook."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.bench import bench_cases, run

SCALE_PLUGIN = """
import torch
import graphopt
from graphopt.rewrite.adapters import fold_input_transforms, insert_input_transform


def scale_inputs(x, scale):
    return x * scale


class ScaleInputs(graphopt.Method):
    '''Scale each targeted layer's input features by a learned vector (W' = W diag(s) when folded).'''
    name = "scale-inputs"
    stage = "forward"

    def __init__(self, targets: str | list[str] | None = None, init: float = 1.0) -> None:
        self.targets, self.init = targets, init
        self.check(init > 0, "init", "use init > 0")

    def apply(self, gm, ctx):
        for layer in ctx.select(self.targets):
            name = ctx.add_parameter(layer.path, "scale", torch.full((layer.in_features,), self.init))
            insert_input_transform(ctx, layer, scale_inputs, [name])
        ctx.add_export_pass(lambda g: fold_input_transforms(g, scale_inputs, lambda w, s: w * s), merge=True)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(ScaleInputs)
"""


def test_builtin_methods_come_from_the_graphopt_distribution() -> None:
    info = graphopt.list_methods()["sgd"]
    assert (info.stage, info.plugin) == ("training", "graphopt")
    assert [o.name for o in info.options][:4] == ["lr", "momentum", "nesterov", "weight_decay"]
    assert info.options[0].required and info.options[1].default == 0.0
    assert "torch.optim.SGD" in info.doc


def test_entry_point_plugin_is_discovered(install_plugin, mlp) -> None:
    install_plugin("toy-scale", "toyscale", "toy_scale", SCALE_PLUGIN)
    info = graphopt.list_methods()["scale-inputs"]
    assert info.plugin == "toy-scale" and info.stage == "forward"
    x = torch.randn(3, 8)
    m = graphopt.compile(mlp, methods=["scale-inputs(targets='head', init=2.0)"], example_inputs=(x,), backend="eager")
    assert [n for n, _ in m.trainable_parameters().items()] == ["head.scale-inputs_scale"]
    hidden = mlp.encoder(x)
    torch.testing.assert_close(m(x), F.linear(2.0 * hidden, mlp.head.weight, mlp.head.bias), rtol=0, atol=1e-6)


def test_disabled_plugin_is_blocked(install_plugin, monkeypatch) -> None:
    install_plugin("toy-scale", "toyscale", "toy_scale", SCALE_PLUGIN)
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "toyscale, other")
    graphopt.plugins.reset()
    assert "scale-inputs" not in graphopt.list_methods()
    assert "sgd" in graphopt.list_methods()
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "sgd")
    graphopt.plugins.reset()
    with pytest.raises(graphopt.OptionError, match="method 'sgd' comes from plugin 'sgd', which "
                       "GRAPHOPT_DISABLE_PLUGINS disables"):
        graphopt.compile(methods=["sgd(lr=0.1)"])


def test_duplicate_method_names_name_both_plugins(install_plugin) -> None:
    install_plugin("toy-sgd-clash", "clash", "toy_clash", """
        import graphopt
        from graphopt.builtin.sgd import SGD

        class OtherSGD(SGD):
            '''Another sgd.'''

        @graphopt.hookimpl
        def graphopt_register_methods(register):
            register(OtherSGD)
    """)
    with pytest.raises(graphopt.PluginError, match=r"method 'sgd' is registered by two plugins: '.*' and '.*'"):
        graphopt.list_methods()
    try:
        graphopt.list_methods()
    except graphopt.PluginError as err:
        assert "graphopt" in str(err) and "toy-sgd-clash" in str(err)


def test_plugin_raising_is_named(fresh_plugins) -> None:
    class Broken:
        @graphopt.hookimpl
        def graphopt_register_methods(self, register):
            raise RuntimeError("boom")

    graphopt.register_plugin(Broken(), name="broken-plugin")
    with pytest.raises(graphopt.PluginError, match=r"plugin 'broken-plugin' failed in graphopt_register_methods: "
                                                   r"RuntimeError: boom"):
        graphopt.list_methods()


def test_register_non_method_is_an_error(fresh_plugins) -> None:
    class Wrong:
        @graphopt.hookimpl
        def graphopt_register_methods(self, register):
            register(dict)

    graphopt.register_plugin(Wrong(), name="wrong")
    with pytest.raises(graphopt.PluginError, match=r"not a graphopt\.Method subclass"):
        graphopt.list_methods()


class Recorder:
    """Implements the observer hooks and records what it saw."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    @graphopt.hookimpl
    def graphopt_before_apply(self, method, graph_module, ctx):
        self.events.append(("before", method.name, len(graph_module.graph.nodes)))

    @graphopt.hookimpl
    def graphopt_after_apply(self, method, graph_module, ctx):
        self.events.append(("after", method.name, len(graph_module.graph.nodes)))

    @graphopt.hookimpl
    def graphopt_step_end(self, model, step, loss):
        self.events.append(("step", step, float(loss)))

    @graphopt.hookimpl
    def graphopt_bench_cases(self, register):
        register("recorder-case", lambda quick: {"quick": quick, "value": 1.5})


def test_observer_hooks_run_in_order(install_plugin, mlp) -> None:
    install_plugin("toy-scale", "toyscale", "toy_scale", SCALE_PLUGIN)
    recorder = Recorder()
    graphopt.register_plugin(recorder, name="recorder")
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    m = graphopt.compile(mlp, methods=["scale-inputs", "sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    loss = m.step(x, y)
    assert [e[:2] for e in recorder.events] == [
        ("before", "scale-inputs"), ("after", "scale-inputs"),  # forward stage, at capture
        ("before", "sgd"), ("after", "sgd"),  # training stage, at capture too, after the forward stage
        ("step", 1),
    ]
    assert recorder.events[1][2] > recorder.events[0][2]  # the rewrite added nodes
    assert recorder.events[4][2] == pytest.approx(float(loss))


def test_capture_hook_first_result_wins(fresh_plugins, mlp) -> None:
    class Capturer:
        calls = 0

        @graphopt.hookimpl
        def graphopt_capture(self, model, example_inputs):
            Capturer.calls += 1
            gm = torch.fx.symbolic_trace(model)
            gm.meta["graphopt_capture"] = "my-capturer"
            return gm

    graphopt.register_plugin(Capturer(), name="capturer")
    m = graphopt.compile(mlp, methods=[], example_inputs=(torch.randn(2, 8),), backend="eager")
    assert Capturer.calls == 1 and m.graph_module.meta["graphopt_capture"] == "my-capturer"


def test_bench_cases_hook_and_json(fresh_plugins, tmp_path) -> None:
    graphopt.register_plugin(Recorder(), name="recorder")
    assert "recorder-case" in [c.name for c in bench_cases()]
    out = tmp_path / "bench.json"
    results = run(quick=True, only=["recorder-case"], json_path=str(out))
    saved = json.loads(out.read_text())
    assert saved["cases"]["recorder-case"]["value"] == 1.5 and saved["cases"]["recorder-case"]["quick"] is True
    assert results["cases"]["recorder-case"]["plugin"] == "recorder"


def test_entry_point_that_fails_to_import_is_named(install_plugin, monkeypatch) -> None:
    install_plugin("toy-broken", "brokenplug", "toy_broken", "raise ImportError('needs a missing package')")
    with pytest.raises(graphopt.PluginError, match=r"plugin 'brokenplug' \(distribution 'toy-broken', toy_broken\) "
                                                   r"failed to import: ImportError: needs a missing package.*"
                                                   r"GRAPHOPT_DISABLE_PLUGINS=brokenplug"):
        graphopt.list_methods()
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "brokenplug")
    graphopt.plugins.reset()
    assert "sgd" in graphopt.list_methods()
