"""Layer dropping on the model families people train: the blocks found in each zoo model (``tests/zoo.py``,
default configs) are its layers, and the forward with blocks dropped equals the ``transformers`` model with
those layers deleted (eval mode, float64: dropout would draw other masks).

Llama-family RMSNorm casts its float32 input to float32 (``aten.to``, a no-op the graph still records);
T5's blocks also hand on the position bias they compute; ALBERT calls one layer per depth (one block per
call). Llama runs in the default suite, the rest under ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import ZOO

import graphopt
from graphopt.builtin.layerdrop import variant_graph
from graphopt.rewrite.modes import inference_graph

pytest.importorskip("transformers")

FAST = ("llama",)
MODELS = ("llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt", "falcon", "t5", "bert", "roberta",
          "distilbert", "electra", "vit", "swin", "resnet", "convnext", "whisper")
# which block indices to drop (T5: the second encoder and the second decoder block; its first blocks
# compute the position bias the others reuse, so deleting them changes the model itself)
DROP = {"t5": (1, 3), "swin": (1, 3)}


def delete_layers(model: torch.nn.Module, paths: list[str]) -> torch.nn.Module:
    """A copy of ``model`` with the layers at ``paths`` (entries of ``nn.ModuleList`` / ``nn.Sequential``) deleted."""
    model = copy.deepcopy(model)
    for path in sorted(paths, key=lambda p: -int(p.rpartition(".")[2])):
        parent, _, index = path.rpartition(".")
        del model.get_submodule(parent)[int(index)]
    return model


def compiled(name: str) -> tuple[graphopt.CompiledModel, torch.nn.Module, dict]:
    zoo = ZOO[name]
    model = zoo.build(0).double()
    inputs, _ = zoo.batch(0)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    m = graphopt.compile(model, methods=[("layerdrop", {"schedule": "uniform", "blocks": zoo.blocks}), "adamw"],
                         loss_fn=zoo.loss, backend="eager", example_inputs=inputs)
    return m, model, inputs


def check_dropped_forward(name: str) -> None:
    m, model, inputs = compiled(name)
    blocks = m.layerdrop_blocks()
    assert len(blocks) >= 2, [str(b) for b in blocks]
    drop = DROP.get(name, (1,))
    paths = [b.path for b in blocks]
    special, skipped = variant_graph(paths, "uniform", "layerdrop", m.graph_module, frozenset(drop))
    assert {p for i in drop for p in blocks[i].parameters} <= skipped  # dropped layers get no update
    reference = delete_layers(model, [paths[i] for i in drop]).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = inference_graph(special)(**inputs).logits
        full = m.eval()(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    assert (full - expected).abs().max() > 1e-9  # the dropped layers did change the output (ConvNeXt's
    # layer scale starts at 1e-6, so its layers change it little)


@pytest.mark.parametrize("name", FAST)
def test_dropped_layers_equal_the_model_with_those_layers_deleted(name: str) -> None:
    check_dropped_forward(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in FAST])
def test_dropped_layers_equal_the_model_with_those_layers_deleted_everywhere(name: str) -> None:
    check_dropped_forward(name)


@pytest.mark.slow
def test_found_blocks_are_the_layers_without_naming_them() -> None:
    """blocks=None finds T5's blocks (T5Block made of a self-attention and a feed-forward sub-layer, each
    x + f(x) itself, is one block) and one block per call of ALBERT's shared layer group."""
    found = {}
    for name in ("t5", "albert"):
        zoo = ZOO[name]
        inputs, _ = zoo.batch(0)
        m = graphopt.compile(zoo.build(0), methods=["layerdrop", "adamw"], loss_fn=zoo.loss, backend="eager",
                             example_inputs=inputs)
        found[name] = [b.path for b in m.layerdrop_blocks()]
    assert found["t5"] == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    group = "albert.encoder.albert_layer_groups.0"
    assert found["albert"] == [group, f"{group}@1"]
