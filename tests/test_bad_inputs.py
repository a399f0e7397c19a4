"""Bad input, table-driven: every case asserts the error class and a phrase of its message (what is wrong and
the fix), and where a call fails after the model exists, that nothing changed. Categories: specs, options,
models and inputs, training faults, checkpoints, export, the command line."""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from models import MLP
from torch import nn

import graphopt
import graphopt.plugins

X, Y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])


def compiled(*methods: str, **options) -> graphopt.CompiledModel:
    torch.manual_seed(0)
    options.setdefault("backend", "eager")
    options.setdefault("loss_fn", F.cross_entropy)
    return graphopt.compile(MLP(), methods=list(methods), example_inputs=(X,), **options)


def snapshot(m: graphopt.CompiledModel) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in m.state_dict().items()}


def unchanged(m: graphopt.CompiledModel, before: dict) -> bool:
    after = m.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


class NoParameters(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


SPEC_AND_OPTION_CASES = [
    # -- the spec grammar ------------------------------------------------------------------------------
    ("trailing call", lambda: graphopt.compile(methods=["sgd(lr=0.1)[0](lr=5)"]), graphopt.OptionError,
     "nothing after it"),
    ("second option list", lambda: graphopt.compile(methods=["hra(r=2)(targets='head')"]), graphopt.OptionError,
     "nothing after it"),
    ("unclosed", lambda: graphopt.compile(methods=["sgd(lr=0.1"]), graphopt.OptionError, "cannot parse"),
    ("two words", lambda: graphopt.compile(methods=["sgd x"]), graphopt.OptionError, "cannot parse"),
    ("empty spec", lambda: graphopt.compile(methods=[""]), graphopt.OptionError, "cannot parse"),
    ("positional option", lambda: graphopt.compile(methods=["sgd(0.1)"]), graphopt.OptionError, "by name"),
    ("code as a value", lambda: graphopt.compile(methods=["sgd(lr=__import__('os'))"]), graphopt.OptionError,
     "must be a literal"),
    ("double star", lambda: graphopt.compile(methods=["sgd(**{'lr': 1})"]), graphopt.OptionError, "not allowed"),
    ("option twice", lambda: graphopt.compile(methods=["sgd(lr=1, lr=2)"]), graphopt.OptionError,
     "repeated|twice"),
    ("unknown method", lambda: graphopt.compile(methods=["nosuch"]), graphopt.OptionError, "unknown method 'nosuch'"),
    ("misspelt method", lambda: graphopt.compile(methods=["sdg(lr=0.1)"]), graphopt.OptionError,
     "did you mean 'sgd'"),
    ("methods=None", lambda: graphopt.compile(methods=None), graphopt.OptionError, "methods=None is invalid"),
    ("a number as a spec", lambda: graphopt.compile(methods=[42]), graphopt.OptionError, "bad method spec"),
    ("a method twice", lambda: graphopt.compile(methods=["sgd(lr=0.1)", "sgd(lr=0.2)"]), graphopt.OptionError,
     "listed twice"),
    ("two optimizers", lambda: graphopt.compile(methods=["sgd(lr=0.1)", "adamw"]), graphopt.OptionError,
     "one optimizer method per model"),
    ("unknown option", lambda: graphopt.compile(methods=["sgd(lr=0.1, momentun=0.9)"]), graphopt.OptionError,
     "has no option 'momentun'"),
    ("missing option", lambda: graphopt.compile(methods=["sgd"]), graphopt.OptionError, "needs option 'lr'"),
    ("wrong type", lambda: graphopt.compile(methods=["sgd(lr='fast')"]), graphopt.OptionError, "must be float"),
    # -- non-finite and out-of-range values ------------------------------------------------------------
    ("lr=inf", lambda: graphopt.compile(methods=[("sgd", {"lr": math.inf})]), graphopt.OptionError, "finite"),
    ("lr=nan", lambda: graphopt.compile(methods=[("sgd", {"lr": math.nan})]), graphopt.OptionError, "finite"),
    ("adamw eps=inf", lambda: graphopt.compile(methods=[("adamw", {"eps": math.inf})]), graphopt.OptionError,
     "finite"),
    ("adamw weight_decay=inf", lambda: graphopt.compile(methods=[("adamw", {"weight_decay": math.inf})]),
     graphopt.OptionError, "finite"),
    ("adamw betas with inf", lambda: graphopt.compile(methods=[("adamw", {"betas": (0.9, math.inf)})]),
     graphopt.OptionError, "finite"),
    ("sora alpha=inf", lambda: graphopt.compile(methods=[("sora", {"alpha": math.inf})]), graphopt.OptionError,
     "finite"),
    ("tract lam=inf", lambda: graphopt.compile(methods=[("tract", {"lam": math.inf})]), graphopt.OptionError,
     "finite"),
    ("hra reg_lambda=nan", lambda: graphopt.compile(methods=[("hra", {"reg_lambda": math.nan})]),
     graphopt.OptionError, "finite"),
    ("muon negative lr", lambda: graphopt.compile(methods=["muon(lr=-1.0)"]), graphopt.OptionError, "lr > 0"),
    ("lora r=0", lambda: graphopt.compile(methods=["lora(r=0)"]), graphopt.OptionError, "r >= 1"),
    ("hra odd r", lambda: graphopt.compile(methods=["hra(r=3)"]), graphopt.OptionError, "even"),
    ("layerdrop p=1", lambda: graphopt.compile(methods=["layerdrop(p=1.0)"]), graphopt.OptionError, "p < 1"),
    ("max_grad_norm=0", lambda: graphopt.compile(methods=["sgd(lr=0.1, max_grad_norm=0.0)"]), graphopt.OptionError,
     "max_grad_norm"),
    ("accumulation 0", lambda: graphopt.compile(methods=[], gradient_accumulation_steps=0), graphopt.OptionError,
     "gradient_accumulation_steps=0"),
    ("unknown precision", lambda: graphopt.compile(methods=[], precision="fp16"), graphopt.OptionError,
     "precision='fp16'"),
    ("unknown policy", lambda: graphopt.compile(methods=[], on_nonfinite="ignore"), graphopt.OptionError,
     "on_nonfinite='ignore'"),
    ("16-mixed with apply", lambda: graphopt.compile(methods=[], precision="16-mixed", on_nonfinite="apply"),
     graphopt.OptionError, "cannot go with"),
    ("trainable not globs", lambda: graphopt.compile(methods=[], trainable=[3]), graphopt.OptionError,
     "trainable=\\[3\\]"),
    ("unknown backend", lambda: graphopt.compile(methods=[], backend="tvm"), graphopt.OptionError, "backend 'tvm'"),
    ("example inputs as a tensor", lambda: graphopt.compile(MLP(), example_inputs=X), graphopt.OptionError,
     "example_inputs must be a tuple"),
    ("not a module", lambda: graphopt.compile(42), TypeError, "takes an nn.Module"),
    # -- options checked against the model ----------------------------------------------------------------
    ("lora r above the layer", lambda: compiled("lora(r=100000)"), graphopt.OptionError, "larger than layer"),
    ("sora r above the layer", lambda: compiled("sora(r=100000)"), graphopt.OptionError, "larger than layer"),
    ("hra r above in_features", lambda: compiled("hra(r=100)"), graphopt.OptionError, "larger than in_features"),
    ("oftv2 block not dividing", lambda: compiled("oftv2(block_size=3)"), graphopt.OptionError, "does not divide"),
    ("targets matching nothing", lambda: compiled("hra(targets='nosuch')"), graphopt.OptionError, "matches no"),
    ("groups matching nothing", lambda: compiled("sgd(lr=0.1, groups={'nosuch*': {'lr': 0.1}})"),
     graphopt.OptionError, "matches no trainable parameter"),
    ("trainable matching nothing", lambda: compiled("hra(r=2)", trainable=["nosuch"]), graphopt.OptionError,
     "matches no parameter or module"),
    ("dynamic_dims a string", lambda: compiled(dynamic_dims="0"), graphopt.OptionError, "is invalid"),
    ("dynamic_dims out of range", lambda: compiled(dynamic_dims=[(0, 5)]), graphopt.OptionError, "out of range"),
    ("dynamic_dims unknown input", lambda: compiled(dynamic_dims={"nosuch": (0,)}), graphopt.OptionError,
     "names input 'nosuch'"),
    ("layerdrop without blocks", lambda: compiled("layerdrop"), graphopt.OptionError, "found no residual block"),
    ("checkpointing without blocks", lambda: compiled("sgd(lr=0.1)", checkpoint_blocks=True).step(X, Y),
     graphopt.OptionError, "found no residual block"),
]


@pytest.mark.parametrize("action, error, phrase", [c[1:] for c in SPEC_AND_OPTION_CASES],
                         ids=[c[0] for c in SPEC_AND_OPTION_CASES])
def test_specs_and_options(action, error, phrase) -> None:
    with pytest.raises(error, match=phrase):
        action()


def test_a_disabled_plugin_is_named_as_disabled(monkeypatch, fresh_plugins) -> None:
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "hra")
    graphopt.plugins.reset()
    with pytest.raises(graphopt.OptionError, match="method 'hra' comes from plugin 'hra', which "
                                                   "GRAPHOPT_DISABLE_PLUGINS disables"):
        graphopt.compile(methods=["hra"])


def test_a_spec_parses_in_linear_time() -> None:
    start = time.perf_counter()
    with pytest.raises(graphopt.OptionError, match="cannot parse"):
        graphopt.compile(methods=["sgd" + " " * 32000 + "x"])
    assert time.perf_counter() - start < 0.5


# -- the model and its inputs: errors after capture change nothing ---------------------------------------------
CALL_CASES = [
    ("another feature size", lambda m: m(torch.randn(2, 9)), graphopt.InputError,
     r"dim 1 of input 0 is 9 here, captured as 8 and static.*dynamic_dims"),
    ("another rank", lambda m: m(torch.randn(8)), graphopt.InputError, "with 2 dims"),
    ("another dtype", lambda m: m(torch.randn(2, 8, dtype=torch.float64)), graphopt.InputError,
     "dtype torch.float32"),
    ("an extra input", lambda m: m(X, X), graphopt.InputError, r"captured for inputs \(float32\[\*, 8\]\)"),
    ("a keyword instead", lambda m: m(x=X), graphopt.InputError, "same positional and keyword inputs"),
    ("step without target", lambda m: m.step(X), TypeError, "needs the inputs and the target"),
    ("step with a wrong feature size", lambda m: m.step(torch.randn(6, 9), Y), graphopt.InputError, "static"),
    ("a non-scalar loss", lambda m: graphopt.compile(
        MLP(), methods=["sgd(lr=0.1)"], backend="eager",
        loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none")).step(X, Y), graphopt.StepError,
     "must return a scalar"),
    ("a float target for cross entropy", lambda m: m.step(X, torch.randn(6)), graphopt.StepError,
     "loss_fn failed on the model's output"),
    ("a step without optimizer", lambda m: graphopt.compile(MLP(), backend="eager", loss_fn=F.cross_entropy)
     .step(X, Y), graphopt.OptionError, "needs an optimizer method"),
    ("no loss", lambda m: graphopt.compile(MLP(), methods=["sgd(lr=0.1)"], backend="eager").step(X),
     graphopt.StepError, "needs a loss"),
    ("nothing to train", lambda m: graphopt.compile(NoParameters(), methods=["sgd(lr=0.1)"], backend="eager",
                                                   loss_fn=F.mse_loss).step(X, X), graphopt.StepError,
     "nothing to train"),
    ("data-dependent control flow", lambda m: graphopt.compile(DataDependent(), example_inputs=(X,)),
     graphopt.CaptureError, "offending code"),
    ("inputs the forward does not take", lambda m: graphopt.compile(MLP(), example_inputs=(X, X)),
     graphopt.InputError, "does not take the inputs"),
    ("parameters before capture", lambda m: list(graphopt.compile(MLP()).parameters()), graphopt.NotCapturedError,
     "captured on first call"),
    ("graph before capture", lambda m: graphopt.compile(MLP()).graph_module, graphopt.NotCapturedError,
     "example_inputs"),
    ("export before capture", lambda m: graphopt.export(graphopt.compile(MLP()), "x.onnx"),
     graphopt.NotCapturedError, "captured on first call"),
    ("pickling", lambda m: pickle.dumps(m), TypeError, "cannot be pickled or copied"),
    ("deep copy", lambda m: copy.deepcopy(m), TypeError, "compiled again with graphopt.compile"),
    ("a method function before it exists", lambda m: m.prune(), AttributeError, "no attribute 'prune'"),
]


@pytest.mark.parametrize("action, error, phrase", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_calls_that_do_not_fit(action, error, phrase) -> None:
    m = compiled("hra(r=2)", "adamw(lr=1e-2)")
    m.step(X, Y)
    before = snapshot(m)
    with pytest.raises(error, match=phrase):
        action(m)
    assert unchanged(m, before)


def test_example_inputs_are_not_modified_and_later_changes_to_the_model_do_not_leak() -> None:
    class Mutates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)  # mutates its input
            return self.fc(x)

    x = torch.randn(3, 8)
    kept = x.clone()
    graphopt.compile(Mutates(), example_inputs=(x,), backend="eager")
    assert torch.equal(x, kept)
    model = MLP()
    m = graphopt.compile(model, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # after compile, before the first call: the copy was taken at compile
    torch.testing.assert_close(m(X), reference(X))


# -- training faults ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", ["nan", "inf", "empty"])
def test_a_bad_batch_raises_by_default_and_changes_nothing(batch) -> None:
    m = compiled("adamw(lr=1e-2)")
    m.step(X, Y)
    before = snapshot(m)
    bad = {"nan": (X.clone().fill_(math.nan), Y), "inf": (X * math.inf, Y), "empty": (X[:0], Y[:0])}[batch]
    with pytest.raises(graphopt.StepError, match="is not finite; nothing was updated"):
        m.step(*bad)
    assert unchanged(m, before)


def test_a_step_end_hook_that_raises_names_its_plugin_and_that_the_step_was_applied(fresh_plugins) -> None:
    class Broken:
        @graphopt.hookimpl
        def graphopt_step_end(self, model, step, loss):
            raise RuntimeError("logger down")

    graphopt.register_plugin(Broken(), name="broken-logger")
    m = compiled("sgd(lr=0.1)")
    with pytest.raises(graphopt.PluginError, match=r"plugin 'broken-logger' failed in graphopt_step_end after step "
                                                   r"1 was applied: RuntimeError: logger down"):
        m.step(X, Y)
    assert m.step_count == 1


def test_concurrent_steps_are_serialised() -> None:
    m = compiled("sgd(lr=0.01)")
    m.step(X, Y)
    errors = []

    def train() -> None:
        try:
            for _ in range(10):
                m.step(X, Y)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=train) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and m.step_count == 31


# -- checkpoints: every failed load changes nothing ------------------------------------------------------
@pytest.fixture(scope="module")
def trained() -> tuple[graphopt.CompiledModel, dict]:
    """A model after two steps, and the state of another after one: the checkpoints below are edits of it."""
    m = compiled("hra(r=2)", "adamw(lr=1e-2)")
    m.step(X, Y)
    saved = snapshot(m)
    m.step(X, Y)
    return m, saved


def _state(saved: dict, **changes) -> dict:
    state = dict(saved)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            state.pop(key)
        else:
            state[key] = value(state[key]) if callable(value) else value
    return state


CHECKPOINT_CASES = [
    ("missing tensor", lambda s: _state(s, head__hra_u=None), "missing \\['head.hra_u'\\]"),
    ("unexpected tensor", lambda s: {**_state(s), "extra.weight": torch.zeros(1)}, "unexpected \\['extra.weight'\\]"),
    ("another shape", lambda s: _state(s, head__hra_u=torch.zeros(16, 4)), "the model's is float32\\[16, 2\\]"),
    ("another dtype", lambda s: _state(s, head__weight=lambda t: t.double()), "float64"),
    ("nan in a tensor", lambda s: _state(s, head__bias=lambda t: t.clone().fill_(math.nan)), "nan or inf"),
    ("nan lr", lambda s: _state(s, _graphopt__lr=math.nan), "finite learning rate"),
    ("negative lr", lambda s: _state(s, _graphopt__lr=-1.0), "finite learning rate"),
    ("string lr", lambda s: _state(s, _graphopt__lr="fast"), "finite learning rate"),
    ("negative step", lambda s: _state(s, _graphopt__step=-3), "count >= 0"),
    ("another optimizer's state", lambda s: {k: v for k, v in _state(s).items() if "exp_avg_sq" not in k},
     "comes from another optimizer"),
    ("missing optimizer state", lambda s: {k: v for k, v in _state(s).items() if "optim.head.hra_u" not in k},
     "missing"),
    ("an absent method's state", lambda s: {**_state(s), "_graphopt.method.layerdrop.seed": 1}, "no state for"),
    ("not graphopt's format", lambda s: {**_state(s), "_graphopt.bogus": 1}, "unexpected \\['_graphopt.bogus'\\]"),
    ("not a dict", lambda s: [1, 2], "takes the dict"),
    ("a bad generator state", lambda s: _state(s, _graphopt__rng__cpu=torch.zeros(3)), "generator state"),
    ("a micro count too large", lambda s: _state(s, _graphopt__micro=5), "gradient_accumulation_steps"),
]


@pytest.mark.parametrize("make, phrase", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_bad_checkpoint_is_refused_before_anything_loads(trained, make, phrase) -> None:
    m, saved = trained
    before = snapshot(m)
    try:
        with pytest.raises(graphopt.CheckpointError, match=phrase):
            m.load_state_dict(make(saved))
        assert unchanged(m, before)
    finally:
        m.load_state_dict(before)  # the next case starts from the same model even when this one failed


def test_strict_false_reports_what_it_left_out_and_loads_the_rest(trained) -> None:
    state = {**_state(trained[1], head__hra_u=None), "extra.weight": torch.zeros(1)}
    m = compiled("hra(r=2)", "adamw(lr=1e-2)")
    report = m.load_state_dict(state, strict=False)
    assert report.missing_keys == ["head.hra_u"] and report.unexpected_keys == ["extra.weight"]
    assert torch.equal(m.state_dict()["encoder.0.hra_u"], state["encoder.0.hra_u"])


def test_a_pruned_sora_checkpoint_loads_into_a_fresh_model() -> None:
    m = compiled("sora(r=4, sparse_lambda=0.0)", "sgd(lr=0.1, momentum=0.9)")
    m.step(X, Y)
    with torch.no_grad():
        m.graph_module.get_parameter("encoder.0.sora_gate")[1:3] = 0
        m.graph_module.get_parameter("head.sora_gate").zero_()
    m.prune()
    fresh = compiled("sora(r=4, sparse_lambda=0.0)", "sgd(lr=0.1, momentum=0.9)")
    fresh.load_state_dict(m.state_dict())
    assert fresh.sora_ranks() == m.sora_ranks() == {"encoder.0": (2, 4), "encoder.2": (4, 4), "head": (0, 4)}
    torch.testing.assert_close(fresh(X), m(X), rtol=0, atol=0)
    for model in (m, fresh):
        torch.manual_seed(0)
        model.step(X, Y)
    assert all(torch.equal(p, m.trainable_parameters()[n]) for n, p in fresh.trainable_parameters().items())


# -- export: a failed export leaves the target as it was ----------------------------------------------------
EXPORT_CASES = [
    ("unknown suffix", lambda m, d: graphopt.export(m, d / "model.txt"), "use a path ending in one of"),
    ("atol nan", lambda m, d: graphopt.export(m, d / "model.onnx", atol=math.nan), "atol=nan is invalid"),
    ("atol negative", lambda m, d: graphopt.export(m, d / "model.onnx", atol=-1.0), "atol=-1.0 is invalid"),
    ("rtol inf", lambda m, d: graphopt.export(m, d / "model.pt2", rtol=math.inf), "rtol=inf is invalid"),
    ("a folder that cannot be written", lambda m, d: graphopt.export(m, "/proc/graphopt/model.onnx"),
     "cannot write"),
]


@pytest.mark.parametrize("action, phrase", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_a_failed_export_changes_no_file(tmp_path, action, phrase) -> None:
    m = compiled("hra(r=2)", "adamw(lr=1e-2)")
    m.step(X, Y)
    m.eval()
    for name in ("model.onnx", "model.pt2"):
        (tmp_path / name).write_bytes(b"the good file")
    with pytest.raises(graphopt.ExportError, match=phrase):
        action(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]  # no leftovers
    assert all((tmp_path / name).read_bytes() == b"the good file" for name in ("model.onnx", "model.pt2"))


@pytest.mark.parametrize("name", ["model.onnx", "model.pt2"])
def test_an_export_whose_check_fails_writes_nothing(tmp_path, monkeypatch, name) -> None:
    m = compiled("hra(r=2)", "adamw(lr=1e-2)")
    m.step(X, Y)
    (tmp_path / name).write_bytes(b"the good file")
    # a file that disagrees with PyTorch
    export_module = sys.modules["graphopt.export"]
    monkeypatch.setattr(export_module, "_compare", lambda *args: export_module.Comparison(0.5, 0.5))
    message = r"differs from the PyTorch model by 0.5 \(> atol=0.0001 \+ rtol=0.0001 \* \|output\|\); nothing was"
    with pytest.raises(graphopt.ExportError, match=message):
        graphopt.export(m, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name] and (tmp_path / name).read_bytes() == b"the good file"


# -- the command line: one line on stderr, a non-zero exit -------------------------------------------------
MODEL_FILE = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

def needs_arguments(width):
    return nn.Linear(width, 2)

def raises():
    raise RuntimeError("no weights here")
"""

CLI_CASES = [
    ("missing module", ["show", "nosuch_module_xyz:make"], "cannot import 'nosuch_module_xyz'"),
    ("missing file", ["show", "nosuch.py:make"], "does not exist"),
    ("missing factory", ["show", "{file}:nosuch"], "has no attribute 'nosuch'"),
    ("factory needs arguments", ["show", "{file}:needs_arguments"], "needs arguments"),
    ("factory raises", ["show", "{file}:raises"], "raised RuntimeError: no weights here"),
    ("syntax error", ["show", "{bad}:make"], "syntax error at line"),
    ("bad reference", ["show", "nocolon"], "must look like MODULE:FACTORY"),
    ("bad input shape", ["export", "{file}:make", "--input-shape", "a,b", "-o", "{out}"], "comma-separated"),
    ("zero input shape", ["export", "{file}:make", "--input-shape", "0,8", "-o", "{out}"], "must be >= 1"),
    ("bad dynamic dims", ["export", "{file}:make", "--dynamic-dims", "x", "-o", "{out}"], "comma-separated"),
    ("integers into a float model", ["export", "{file}:make", "--input-dtype", "int64", "-o", "{out}"],
     "cannot capture"),
    ("an unwritable output", ["export", "{file}:make", "-o", "/proc/graphopt/out.onnx"], "cannot write"),
    ("an unknown method", ["show", "{file}:make", "-m", "nosuch"], "unknown method 'nosuch'"),
    ("a bad spec", ["show", "{file}:make", "-m", "hra(r=2)(x=1)"], "nothing after it"),
    ("a bench case that does not exist", ["bench", "--only", "nosuch-case"], "no bench case matches"),
    ("an unknown flag", ["methods", "--bogus"], "unrecognized arguments"),
]


def _write_models(folder) -> dict[str, str]:
    (folder / "models.py").write_text(textwrap.dedent(MODEL_FILE))
    (folder / "bad.py").write_text("def make(:\n    pass\n")
    return {"file": str(folder / "models.py"), "bad": str(folder / "bad.py"), "out": str(folder / "o.onnx")}


@pytest.mark.parametrize("argv, phrase", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_command_line_says_one_line_and_exits_non_zero(tmp_path, monkeypatch, capsys, argv, phrase) -> None:
    from graphopt.cli import main

    names = _write_models(tmp_path)
    monkeypatch.chdir(tmp_path)
    try:
        code = main([a.format(**names) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:") or ": error: " in line]
    assert code != 0 and len(errors) == 1 and phrase in errors[0], stderr
    assert "Traceback" not in stderr and not (tmp_path / "o.onnx").exists()


def test_the_command_line_process_exits_2_with_one_line(tmp_path) -> None:
    names = _write_models(tmp_path)
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "show", names["file"] + ":make", "-m", "nosuch"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={"GRAPHOPT_VERBOSITY": "warning", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("error: unknown method 'nosuch'")], result.stderr
