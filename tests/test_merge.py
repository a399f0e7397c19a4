"""Back to plain models: ``m.merged_module()`` (the user's class, adapters folded, strict-loadable into the
original architecture, HF ``save_pretrained`` round trip), and adapter-only ``adapter_state_dict`` /
``load_adapter_state_dict``."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MLP
from test_peft_interop import TOKENS, hf_bert, hf_gpt2, randomise

import graphopt
from graphopt.rewrite.adapters import insert_input_transform

transformers = pytest.importorskip("transformers")


def compile_eager(model, methods, x=TOKENS):
    return graphopt.compile(model, methods=[*methods, "sgd(lr=0.1)"], backend="eager", example_inputs=(x,))


def test_eval_graph_of_a_default_dropout_bert_is_the_eval_model() -> None:
    """Attention dropout (``scaled_dot_product_attention``'s ``dropout_p``) is off in the inference graph too."""
    base = hf_bert()
    m = compile_eager(base, [])
    with torch.no_grad():
        assert torch.equal(m.eval()(TOKENS).logits, base.eval()(TOKENS).logits)


@pytest.mark.parametrize("spec", ["lora(r=4, targets=['*.query', '*.value'])",
                                  "hra(r=4, targets='*.intermediate.dense')",
                                  "oftv2(block_size=8, targets='*.attention.output.dense')"])
def test_bert_merged_module_loads_strictly_and_round_trips_through_save_pretrained(spec: str, tmp_path) -> None:
    base = hf_bert()
    m = compile_eager(base, [spec])
    randomise(m)
    merged = m.merged_module()
    assert type(merged) is type(base)
    with torch.no_grad():
        expected = m.eval()(TOKENS).logits
        assert (expected - base.eval()(TOKENS).logits).abs().max() > 1e-4   # the adapter changed the model
        assert torch.allclose(merged.eval()(TOKENS).logits, expected, atol=1e-5)
    # the two non-persistent buffers (embeddings.position_ids, token_type_ids) are buffers, not saved state
    fresh = hf_bert()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert set(merged.state_dict()) == set(base.state_dict())
    merged.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(TOKENS).logits, expected, atol=1e-5)
    untouched = hf_bert().state_dict()   # the user's model is untouched (not folded, not on meta)
    assert all(torch.equal(v, untouched[k]) for k, v in base.state_dict().items())


def test_gpt2_merged_module_keeps_the_tied_embedding(tmp_path) -> None:
    base = hf_gpt2()
    m = compile_eager(base, ["lora(r=4, targets='*.c_attn')"])
    randomise(m)
    merged = m.merged_module()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    hf_gpt2().load_state_dict(merged.state_dict(), strict=True)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(TOKENS).logits, m.eval()(TOKENS).logits, atol=1e-5)


def test_merged_module_of_a_conv_model_and_its_requires_grad() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1, groups=2), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(2, 4, 8, 8)
    model(x)
    m = compile_eager(model, ["oftv2(block_size=4, targets=['0', '2'])"], x=x)
    randomise(m, scale=0.3)
    merged = m.merged_module()
    assert type(merged) is torch.nn.Sequential and all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        assert torch.allclose(merged.eval()(x), m.eval()(x), atol=1e-5)


def test_merged_module_refuses_an_unfolded_adapter() -> None:
    def scale_input(x, s):
        return x * s

    class NoFold(graphopt.Method):
        name = "nofold"

        def apply(self, gm, ctx):
            for layer in ctx.select(None):
                insert_input_transform(ctx, layer, scale_input, [ctx.add_parameter(layer.path, "s",
                                                                                   torch.ones(layer.in_features))])

    class Plugin:
        @graphopt.hookimpl
        def graphopt_register_methods(self, register):
            register(NoFold)

    name = graphopt.register_plugin(Plugin(), name="test-nofold")
    try:
        m = compile_eager(MLP(), ["nofold"], x=torch.randn(2, 8))
        with pytest.raises(graphopt.GraphoptError, match=r"still holds .*nofold_s.*adapter unfolded"):
            m.merged_module()
    finally:
        graphopt.unregister_plugin(name)


def test_adapter_state_dict_round_trip_and_errors() -> None:
    base = hf_bert()
    spec = "lora(r=4, targets=['*.query', '*.value'])"
    m = compile_eager(base, [spec])
    randomise(m)
    state = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    assert set(state) == {f"bert.encoder.layer.{i}.attention.self.{t}.lora_{f}" for i in (0, 1)
                          for t in ("query", "value") for f in "AB"}
    other = compile_eager(base, [spec])
    other.load_adapter_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other.eval()(TOKENS).logits, m.eval()(TOKENS).logits)
    with pytest.raises(graphopt.CheckpointError, match=r"unknown key.*bert\.nope"):
        other.load_adapter_state_dict({**state, "bert.nope": torch.zeros(1)})
    with pytest.raises(graphopt.CheckpointError, match=r"lacks .*lora_B"):
        other.load_adapter_state_dict({k: v for k, v in state.items() if k.endswith("lora_A")})
    key = next(iter(state))
    with pytest.raises(graphopt.CheckpointError, match="has shape"):
        other.load_adapter_state_dict({**state, key: torch.zeros(1, 2)})
    other.load_adapter_state_dict({key: copy.deepcopy(state[key])}, strict=False)


def test_folding_into_a_tied_weight_unties_it_in_export_and_merged_module_refuses() -> None:
    """GPT-2's lm_head shares its weight with the token embedding. merge=True folds the adapter into the LM
    head only (the embedding keeps reading the original tensor under its own name), so the merged graph equals
    the unmerged one; merged_module refuses, as GPT-2's class ties the two and cannot hold both."""
    m = compile_eager(hf_gpt2(), ["lora(r=4, targets='lm_head')"])
    randomise(m)
    merged, unmerged = m.export_graph(merge=True), m.export_graph(merge=False)
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    with torch.no_grad():
        expected, actual = unmerged(TOKENS).logits, merged(TOKENS).logits
        plain = m.eval()(TOKENS).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual, plain, rtol=0, atol=1e-5)
    with pytest.raises(graphopt.GraphoptError, match=r"ties .*lm_head\.weight.*exclude that layer from targets"):
        m.merged_module()
