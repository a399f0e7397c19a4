"""Layers recognised by what the graph computes: ``x @ W.T + b`` in any module (Falcon's ``FalconLinear``),
convs with string padding (``"same"`` / ``"valid"``: ``aten.conv2d.padding``), Conv1d (wav2vec2's feature
extractor: TrAct's formula, hra/oftv2 as weight transforms), and tied parameters under every name (tract's
first layer is the embedding that reads the tied head's weight, and errors name it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO

import graphopt


class MatmulLinear(nn.Module):
    """A linear layer written as ``x @ W.T + b`` (what ``FalconLinear`` computes)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def test_x_matmul_w_transposed_is_a_linear_layer_named_by_its_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(8, 16), nn.GELU(), MatmulLinear(16, 4, bias=False))
    x = torch.randn(5, 8)
    m = graphopt.compile(model, methods=["lora(r=2)", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager",
                         example_inputs=(x,))
    assert sorted(m.trainable_parameters()) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_falcon_attention_and_mlp_get_adapters() -> None:
    zoo = ZOO["falcon"]
    inputs, _ = zoo.batch(0)
    m = graphopt.compile(zoo.build(0), methods=["hra(r=4, targets='*.h.*')", "adamw"], loss_fn=zoo.loss,
                         backend="eager", example_inputs=inputs)
    layers = {n.rpartition(".")[0].rpartition(".")[2] for n in m.trainable_parameters()}
    assert layers == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_convs_take_tract(padding: str) -> None:
    """tract on a Conv2d(padding="same"/"valid") (EfficientNet's stem form): ∇W = G (XᵀX/b + λI)⁻¹ with X the
    unfolded patches (Petersen et al. 2024), computed here with F.unfold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=padding), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x)
    y = torch.randn(2, 2, dtype=torch.float64)
    m = graphopt.compile(model, methods=["tract(lam=0.1)", "sgd(lr=1.0)"], loss_fn=F.mse_loss, backend="eager",
                         example_inputs=(x,))
    assert "tract(lam=0.1) on 0" in m.descriptions()["tract"]
    conv = model[0]
    out = conv(x)
    loss = F.mse_loss(model[2](model[1](out)), y)
    (dy,) = torch.autograd.grad(loss, out)
    rows = F.unfold(x, 3, padding=1 if padding == "same" else 0).transpose(1, 2).reshape(-1, 27)
    grad = dy.permute(1, 0, 2, 3).reshape(4, -1) @ rows
    expected = grad @ torch.linalg.inv(rows.t() @ rows / rows.shape[0] + 0.1 * torch.eye(27, dtype=torch.float64))
    before = m.trainable_parameters()["0.weight"].detach().clone()
    m.step(x, y)
    torch.testing.assert_close(before - m.trainable_parameters()["0.weight"], expected.reshape(4, 3, 3, 3),
                               rtol=1e-8, atol=1e-10)


def test_conv1d_takes_tract_and_the_weight_adapters(tmp_path) -> None:
    """tract on a Conv1d: the formula of a conv over (1, L) images; hra/oftv2 adapt a Conv1d weight as the
    matrix (out, C·k); both export merged and unmerged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 5, stride=2, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 7, 3))
    model = model.double()
    x, y = torch.randn(3, 2, 16, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    m = graphopt.compile(model, methods=["tract(lam=0.1)", "sgd(lr=1.0)"], loss_fn=F.mse_loss, backend="eager",
                         example_inputs=(x,))
    out = model[0](x)
    (dy,) = torch.autograd.grad(F.mse_loss(model[3](model[2](model[1](out))), y), out)
    padded = F.pad(x, (1, 1))
    rows = padded.unfold(2, 5, 2).permute(0, 2, 1, 3).reshape(-1, 10)  # (N·L_out, C·k), channel-major
    grad = dy.permute(1, 0, 2).reshape(4, -1) @ rows
    expected = grad @ torch.linalg.inv(rows.t() @ rows / rows.shape[0] + 0.1 * torch.eye(10, dtype=torch.float64))
    before = m.trainable_parameters()["0.weight"].detach().clone()
    m.step(x, y)
    torch.testing.assert_close(before - m.trainable_parameters()["0.weight"], expected.reshape(4, 2, 5),
                               rtol=1e-8, atol=1e-10)
    for spec in ("hra(r=2, targets='0')", "oftv2(block_size=5, targets='0')"):
        adapted = graphopt.compile(model.float(), methods=[spec, "adamw(lr=1e-2)"], loss_fn=F.mse_loss,
                                   backend="eager", example_inputs=(x.float(),))
        adapted.step(x.float(), y.float())
        for merge in (True, False):
            assert graphopt.export(adapted, tmp_path / f"c1d-{merge}.onnx", merge=merge).max_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(("name", "first"), [("gemma", "model.embed_tokens"), ("t5", "encoder.embed_tokens"),
                                             ("gpt2", "transformer.wte"), ("opt", "model.decoder.embed_tokens")])
def test_tied_weights_are_seen_under_every_name(name: str, first: str) -> None:
    """The embedding reads the tied head's weight under the head's name; tract sees it as the first layer
    (never a later Linear) and names the embedding's own module."""
    zoo = ZOO[name]
    inputs, _ = zoo.batch(0)
    with pytest.raises(graphopt.OptionError, match=rf"first layer in execution order is '{first}'.*layer="):
        graphopt.compile(zoo.build(0), methods=["tract", "adamw"], loss_fn=zoo.loss, backend="eager",
                         example_inputs=inputs)
