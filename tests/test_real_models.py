"""Real third-party models (HF ``transformers``, random init, no downloads) through graphopt.

Models (``tests/real_models.py``): tiny ``BertForSequenceClassification``, ``GPT2LMHeadModel``
(``use_cache=False``; its ``Conv1D`` layers are ``aten.addmm`` with weight ``(in, out)``) and
``ResNetForImageClassification``. Each is captured by ``torch.export`` (non-strict), trained, and its
first ``m.step`` loss is compared with the eager model's loss on the same batch. References are the
eager ``transformers`` models themselves (and, for folded adapters, onnxruntime on the exported file).
The method x model x optimizer matrix and the export matrix are ``slow``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt.rewrite.layers import layer_calls

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from models import BERT, GPT2, MODELS, RESNET, RealModel

ADAPTERS = ("hra", "oftv2", "sora")
METHODS = (*ADAPTERS, "tract", "layerdrop")
OPTIMIZERS = ("adamw", "muon")


def optimizer_spec(name: str) -> str:
    """``adamw`` / ``muon`` when registered, else ``sgd`` (so the file runs before those plugins land)."""
    registered = graphopt.list_methods()
    if name not in registered:
        return "sgd(lr=0.05, momentum=0.9)"
    return {"adamw": "adamw(lr=1e-2, weight_decay=0.0)", "muon": "muon(lr=0.02, adamw_lr=1e-2)"}[name]


def method_spec(rm: RealModel, method: str) -> str:
    """The spec of ``method`` on ``rm``: adapters on the attention/MLP projections, tract on the stem."""
    if method not in graphopt.list_methods():
        pytest.skip(f"method {method!r} is not registered (its plugin has not landed)")
    targets = list(rm.adapter_targets)
    return {
        "hra": f"hra(r=4, targets={targets!r})",
        "oftv2": f"oftv2(block_size=16, targets={targets!r})",
        "sora": f"sora(r=4, targets={targets!r})",
        "tract": f"tract(layer={rm.first_layer!r})",
        "layerdrop": f"layerdrop(schedule='uniform', p=0.5, blocks={rm.blocks!r}, seed=0)",
    }[method]


def full_loss(m: graphopt.CompiledModel, rm: RealModel, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss of the full rewritten forward (no block dropped; batch norm on batch statistics, as in eager
    training mode, so it compares with the eager model's training-mode loss)."""
    with torch.no_grad():
        return rm.loss_fn(m(x), y).item()


def base_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- capture, first step, training (default run) -----------------------------------------------------------
@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def trained(request: pytest.FixtureRequest) -> dict:
    """Each model compiled with a plain optimizer and trained 20 steps on one fixed batch."""
    rm = MODELS[request.param]
    model = rm.build(0)
    x, y = rm.batch(8, 0)
    with torch.no_grad():
        eager_loss = rm.loss_fn(model(x), y).item()
    m = graphopt.compile(model, methods=[optimizer_spec("adamw")], loss_fn=rm.loss_fn, example_inputs=(x,),
                         backend="eager")
    losses = [m.step(x, y).item() for _ in range(20)]
    return {"rm": rm, "model": model, "m": m, "x": x, "y": y, "eager_loss": eager_loss, "losses": losses}


def test_capture_path_is_torch_export(trained: dict) -> None:
    # transformers' forwards are not symbolically traceable (torch.fx.symbolic_trace fails on all three:
    # Python control flow on shapes and config values); non-strict torch.export runs them in Python.
    assert trained["m"].graph_module.meta["graphopt_capture"] == "torch.export"


def test_first_step_loss_equals_eager_model(trained: dict) -> None:
    assert trained["losses"][0] == pytest.approx(trained["eager_loss"], abs=1e-5)


def test_twenty_steps_lower_the_loss(trained: dict) -> None:
    losses = trained["losses"]
    assert losses[-1] < 0.9 * losses[0], losses


def test_user_model_is_untouched(trained: dict) -> None:
    rm, model = trained["rm"], trained["model"]
    with torch.no_grad():
        assert rm.loss_fn(model(trained["x"]), trained["y"]).item() == trained["eager_loss"]


def test_gpt2_conv1d_is_an_addmm_layer() -> None:
    model = GPT2.build(0)
    x, _ = GPT2.batch(2, 0)
    m = graphopt.compile(model, methods=[], example_inputs=(x,), backend="eager")
    calls = {c.path: c for c in layer_calls(m.graph_module)}
    c_attn = calls["model.transformer.h.0.attn.c_attn"]
    module = model.model.transformer.h[0].attn.c_attn
    assert type(module).__name__ == "Conv1D" and tuple(module.weight.shape) == (64, 192)
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features) == ("addmm", 64, 192)
    assert calls["model.lm_head"].kind == "linear"
    assert sum(c.kind == "addmm" for c in calls.values()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer


# -- graph breaks ------------------------------------------------------------------------------------------
class DataDependentBranch(nn.Module):
    """A forward whose Python control flow depends on tensor values: no single graph exists."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:  # the offending line
            h = self.fc2(h)
        return h


def test_data_dependent_control_flow_is_rejected_naming_the_line() -> None:
    lines = Path(__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "# the offending line" in text)
    with pytest.raises(graphopt.CaptureError) as info:
        graphopt.compile(DataDependentBranch(), methods=["hra(r=2)", "sgd(lr=0.1)"], loss_fn=nn.functional.mse_loss,
                         example_inputs=(torch.randn(3, 4),), backend="eager")
    message = str(info.value)
    assert f"{__file__}:{line} in forward: if h.sum() > 0:" in message, message
    assert "torch.where" in message


def test_model_is_never_trained_unrewritten_after_a_failed_capture() -> None:
    m = graphopt.compile(DataDependentBranch(), methods=["sgd(lr=0.1)"], loss_fn=nn.functional.mse_loss,
                         backend="eager")
    x = torch.randn(3, 4)
    for _ in range(2):  # every attempt raises; nothing falls back to running the model eagerly
        with pytest.raises(graphopt.CaptureError, match="offending code"):
            m.step(x, x)


# -- dynamic dims ------------------------------------------------------------------------------------------
def test_bad_dynamic_dims_are_option_errors() -> None:
    x, _ = GPT2.batch(2, 0)
    for bad, pattern in (([(0, 2)], "dim 2 is out of range"), ([(0,), (1,)], "has 2 entries for 1 inputs"),
                         ("0", "is invalid")):
        with pytest.raises(graphopt.OptionError, match=pattern):
            graphopt.compile(GPT2.build(0), methods=[], example_inputs=(x,), backend="eager", dynamic_dims=bad)


@pytest.fixture(scope="module")
def gpt2_hra() -> dict:
    """GPT-2 with HRA on c_attn and c_fc, captured with dynamic (batch, seq), trained 5 steps."""
    model = GPT2.build(0)
    x, y = GPT2.batch(4, 0)
    spec = method_spec(GPT2, "hra")
    m = graphopt.compile(model, methods=[spec, optimizer_spec("adamw")], loss_fn=GPT2.loss_fn, example_inputs=(x,),
                         backend="eager", dynamic_dims=[(0, 1)])
    for _ in range(5):
        m.step(x, y)
    return {"model": model, "m": m, "x": x}


def test_gpt2_folded_adapters_onnx_matches_pytorch_on_two_shapes(gpt2_hra: dict, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    m, model = gpt2_hra["m"], gpt2_hra["model"]
    assert any(name.endswith("hra_u") for name, _ in m.trainable_parameters().items())
    path = tmp_path / "gpt2.onnx"
    report = graphopt.export(m, path, merge=True)
    assert report.checked_shapes == (((4, 8),), ((5, 9),))  # batch and seq both grew in export's own check
    onnx.checker.check_model(str(path))
    (arg,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert all(isinstance(d, str) for d in arg.shape), arg.shape  # both dims symbolic in the file
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m.eval()
    for batch, seq in ((2, 5), (3, 11)):
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            expected = m(ids)
        (actual,) = session.run(None, {arg.name: ids.numpy()})
        assert actual.shape == (batch, seq, 256)
        assert (torch.from_numpy(actual) - expected).abs().max().item() <= 1e-4
    m.train()
    # merge=True: the exported graph has exactly the base model's parameters (adapters folded into W)
    assert sum(p.numel() for p in m.export_graph(merge=True).parameters()) == base_parameter_count(model)
    assert sum(p.numel() for p in m.export_graph(merge=False).parameters()) > base_parameter_count(model)


def test_gpt2_export_py_states_the_base_parameter_count(gpt2_hra: dict, tmp_path: Path) -> None:
    path = tmp_path / "gpt2.py"
    graphopt.export(gpt2_hra["m"], path, merge=True)
    count = int(re.search(r"# parameters: (\d+)", path.read_text()).group(1))
    assert count == base_parameter_count(gpt2_hra["model"])


def test_layerdrop_finds_resnet_blocks_among_batch_norm_counters() -> None:
    # the exported ResNet's residual adds are in-place aten.add_, next to the aten.add_ of every BatchNorm's
    # num_batches_tracked counter; the blocks whose shapes change (stride-2 stage entry) are not droppable
    if "layerdrop" not in graphopt.list_methods():
        pytest.skip("method 'layerdrop' is not registered")
    x, _ = RESNET.batch(4, 0)
    m = graphopt.compile(RESNET.build(0), methods=[method_spec(RESNET, "layerdrop")], example_inputs=(x,),
                         backend="eager")
    counters = [n for n in m.graph_module.graph.nodes if n.target is torch.ops.aten.add_.Tensor
                and "num_batches_tracked" in str(n.args[0])]
    assert len(counters) == 10  # stem BN + 4 basic layers x 2 BNs + the stride-2 shortcut BN
    stages = "model.resnet.encoder.stages"
    assert [b.path for b in m.layerdrop_blocks()] == [f"{stages}.0.layers.0", f"{stages}.0.layers.1",
                                                      f"{stages}.1.layers.1"]


# -- tract's layer on models whose first layer is an embedding -------------------------------------------
@pytest.mark.parametrize("rm", [BERT, GPT2], ids=["bert", "gpt2"])
def test_tract_without_a_layer_on_an_embedding_model_is_a_clear_error(rm: RealModel) -> None:
    if "tract" not in graphopt.list_methods():
        pytest.skip("method 'tract' is not registered")
    x, _ = rm.batch(2, 0)
    with pytest.raises(graphopt.OptionError, match=r"tract.*(embedding|Embedding).*layer="):
        graphopt.compile(rm.build(0), methods=["tract", "sgd(lr=0.1)"], example_inputs=(x,), backend="eager")


# -- every method x model x optimizer (slow) ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rm", list(MODELS.values()), ids=list(MODELS))
def test_method_on_real_model(rm: RealModel, method: str, optimizer: str) -> None:
    spec = method_spec(rm, method)
    if rm.first_layer is None and method == "tract":
        spec = f"tract(layer={'model.bert.encoder.layer.0.attention.self.query' if rm is BERT else 'model.lm_head'!r})"
    model = rm.build(0)
    x, y = rm.batch(8, 0)
    with torch.no_grad():
        eager_loss = rm.loss_fn(model(x), y).item()
    m = graphopt.compile(model, methods=[spec, optimizer_spec(optimizer)], loss_fn=rm.loss_fn, example_inputs=(x,),
                         backend="eager")
    assert m.graph_module.meta["graphopt_capture"] == "torch.export"
    before = full_loss(m, rm, x, y)
    assert before == pytest.approx(eager_loss, abs=1e-5)  # adapters start at identity, tract/layerdrop don't touch it
    losses = [m.step(x, y).item() for _ in range(20)]
    if method != "layerdrop":  # layerdrop's first step runs with blocks dropped
        assert losses[0] == pytest.approx(eager_loss, abs=1e-5)
    assert full_loss(m, rm, x, y) < before


@pytest.mark.slow
@pytest.mark.parametrize("method", (*ADAPTERS, "tract", "layerdrop"))
@pytest.mark.parametrize("rm", list(MODELS.values()), ids=list(MODELS))
def test_export_real_model(rm: RealModel, method: str, tmp_path: Path) -> None:
    import onnxruntime

    spec = method_spec(rm, method)
    if rm.first_layer is None and method == "tract":
        pytest.skip("tract needs a named layer on transformers (covered on ResNet)")
    model = rm.build(0)
    x, y = rm.batch(4, 0)
    dims = None if rm is RESNET else [(0, 1)]
    m = graphopt.compile(model, methods=[spec, optimizer_spec("adamw")], loss_fn=rm.loss_fn, example_inputs=(x,),
                         backend="eager", dynamic_dims=dims)
    for _ in range(3):
        m.step(x, y)
    onnx_report = graphopt.export(m, tmp_path / "m.onnx", merge=True)
    grown = (5, 3, 16, 16) if rm is RESNET else (5, 9)
    assert onnx_report.checked_shapes[1] == (grown,)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x2, _ = rm.batch(3, 1) if rm is RESNET else rm.batch(3, 1, seq=13)
    m.eval()
    with torch.no_grad():
        expected = m(x2)
    m.train()
    (actual,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    assert (torch.from_numpy(actual) - expected).abs().max().item() <= 1e-4
    pt2 = graphopt.export(m, tmp_path / "m.pt2", merge=True)
    assert pt2.max_abs_diff <= 1e-4 and len(pt2.checked_shapes) == 2
    graphopt.export(m, tmp_path / "m.py", merge=True)
    count = int(re.search(r"# parameters: (\d+)", (tmp_path / "m.py").read_text()).group(1))
    assert count == base_parameter_count(model)
