"""Shared weights: ALBERT runs one layer (its weights) at every depth. Each adapter method gives a shared
weight one adapter, applied at every call and folded once at export, so the adapted model is ALBERT with
that weight replaced by the method's effective weight ``W′`` (the reference: the HF class itself, holding
``W′``, built by ``merged_module`` and checked against a hand-made copy). tract on a weight used twice
preconditions each call's gradient with that call's rows (the test computes the formula).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO

import graphopt
from graphopt.builtin.hra import hra_matrix
from graphopt.builtin.oftv2 import rotation_matrix

LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0"
TARGETS = f"{LAYER}.attention.query"


def albert(spec: str) -> tuple[graphopt.CompiledModel, nn.Module, dict]:
    pytest.importorskip("transformers")
    zoo = ZOO["albert"]
    model = zoo.build(0)
    inputs, _ = zoo.batch(0)
    m = graphopt.compile(model, methods=[spec, "adamw(lr=1e-2)"], loss_fn=zoo.loss, backend="eager",
                         example_inputs=inputs)
    return m, model, inputs


def effective_weight(name: str, m: graphopt.CompiledModel, weight: torch.Tensor) -> torch.Tensor:
    """``W′`` from the method's formula and its (randomised) adapter tensors."""
    p = m.trainable_parameters()
    if name == "hra":
        return weight @ hra_matrix(p[f"{TARGETS}.hra_u"].detach().double()).to(weight.dtype)
    if name == "oftv2":
        rotation = rotation_matrix(p[f"{TARGETS}.oftv2_q"].detach(), 32, 4)
        return weight @ rotation.t()
    scale = 16 / 8 if name == "sora" else 8 / 8
    a, b = p[f"{TARGETS}.{name}_A"].detach(), p[f"{TARGETS}.{name}_B"].detach()
    gate = p[f"{TARGETS}.sora_gate"].detach() if name == "sora" else torch.ones(a.shape[0])
    return weight + scale * (b * gate) @ a


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hra", "oftv2", "sora", "lora"])
def test_one_adapter_per_shared_weight_applied_at_every_call_and_folded_once(name: str, tmp_path) -> None:
    m, model, inputs = albert(f"{name}(targets='{TARGETS}')")
    adapters = m.trainable_parameters()
    assert {n.rpartition(".")[0] for n in adapters} == {TARGETS}  # one adapter for the weight used at 2 calls
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapters.values():
            param.add_(0.1 * torch.randn_like(param))  # away from the identity init
    reference = copy.deepcopy(model).eval()
    query = reference.get_submodule(TARGETS)
    with torch.no_grad():
        query.weight.copy_(effective_weight(name, m, query.weight.detach()))
        expected = reference(**inputs).logits
        actual = m.eval()(**inputs).logits
        merged = m.merged_module().eval()(**inputs).logits  # the folded weight, in ALBERT's own class
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    for merge in (True, False):
        report = graphopt.export(m, tmp_path / f"albert-{name}-{merge}.onnx", merge=merge)
        assert report.max_abs_diff < 1e-4


@pytest.mark.slow
def test_sora_prune_removes_a_shared_branch_at_every_call() -> None:
    m, _, inputs = albert(f"sora(targets='{TARGETS}')")
    gate = m.trainable_parameters()[f"{TARGETS}.sora_gate"]
    with torch.no_grad():
        gate.zero_()
        before = m.eval()(**inputs).logits
    m.prune()
    assert m.sora_ranks() == {TARGETS: (0, 8)}
    assert not m.trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs).logits, before, rtol=0, atol=0)


class Twice(nn.Module):
    """One Linear applied twice: ``fc(tanh(fc(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def test_tract_on_a_weight_used_twice_preconditions_each_call_with_its_own_rows() -> None:
    """∇W = Σ_calls G_c (X_cᵀX_c/b + λI)⁻¹ with G_c = dY_cᵀ X_c, X_c the rows that call saw (TrAct, Petersen
    et al. 2024, per call); the bias gradient is plain; the description says the weight is used twice."""
    torch.manual_seed(0)
    model = Twice().double()
    x, target = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    lam = 0.1
    m = graphopt.compile(model, methods=[f"tract(lam={lam}, layer='fc')", "sgd(lr=1.0)"], loss_fn=F.mse_loss,
                         backend="eager", example_inputs=(x,))
    assert "used 2 times (2 call(s)" in m.descriptions()["tract"]
    reference = copy.deepcopy(model)
    w, b = reference.fc.weight, reference.fc.bias
    x1 = x
    y1 = x1 @ w.t() + b
    x2 = torch.tanh(y1)
    y2 = x2 @ w.t() + b
    loss = F.mse_loss(y2, target)
    dy1, dy2, db = torch.autograd.grad(loss, (y1, y2, b))
    eye = torch.eye(6, dtype=torch.float64)
    expected = sum(dy.t() @ rows @ torch.linalg.inv(rows.t() @ rows / rows.shape[0] + lam * eye)
                   for dy, rows in ((dy1, x1.detach()), (dy2, x2.detach())))
    before = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
    m.step(x, target)
    after = m.trainable_parameters()
    torch.testing.assert_close(before["fc.weight"] - after["fc.weight"], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(before["fc.bias"] - after["fc.bias"], db, rtol=1e-9, atol=1e-12)
