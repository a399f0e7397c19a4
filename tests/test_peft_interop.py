"""PEFT interop against the real ``peft`` package: the built-in ``lora`` equals PEFT's LoRA (outputs, gradients,
dropout); PEFT adapters saved by PEFT load into graphopt and graphopt adapters load into PEFT, with equal outputs
(1e-5, eval mode) on tiny random-init BERT and GPT-2 with their default (dropout-on) configs; unsupported PEFT
settings are errors that name the setting."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from models import MLP

import graphopt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_bert() -> torch.nn.Module:
    """BertForSequenceClassification from its default config but small (dropout 0.1 as users train)."""
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=3))


def hf_gpt2() -> torch.nn.Module:
    """GPT2LMHeadModel from its default config but small (dropout 0.1 as users train)."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False, bos_token_id=0,
        eos_token_id=0))


TOKENS = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
MODELS = {"bert": (hf_bert, ["query", "value", "intermediate.dense"]), "gpt2": (hf_gpt2, ["c_attn", "c_fc"])}
CONFIGS = {
    "lora": lambda targets: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                                            init_lora_weights=False),
    "lora-rslora": lambda targets: peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=True,
                                                   init_lora_weights=False),
    "hra": lambda targets: peft.HRAConfig(r=4, target_modules=targets, init_weights=False),
    "oft": lambda targets: peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets, init_weights=False),
    "oft-exact": lambda targets: peft.OFTConfig(r=0, oft_block_size=8, target_modules=targets, init_weights=False,
                                                use_cayley_neumann=False),
}
PAIRS = [(m, c) for m in MODELS for c in CONFIGS if m == "bert" or c.startswith("lora")]  # PEFT's HRA/OFT: no Conv1D


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), diff


def compile_eager(model, methods, x=TOKENS, **options):
    return graphopt.compile(model, methods=methods, backend="eager", example_inputs=(x,), **options)


# -- lora equals PEFT's LoRA -------------------------------------------------------------------------
def lora_pair(dropout: float = 0.0, use_rslora: bool = False):
    torch.manual_seed(0)
    model = MLP()
    config = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, use_rslora=use_rslora, init_lora_weights=False,
                             target_modules=["encoder.0", "encoder.2", "head"])
    p = peft.get_peft_model(copy.deepcopy(model), config)
    m = compile_eager(model, [f"lora(r=4, alpha=6, dropout={dropout}, use_rslora={use_rslora})", "sgd(lr=0.1)"],
                      x=torch.randn(5, 8))
    state = {}
    for path in ("encoder.0", "encoder.2", "head"):
        layer = p.base_model.model.get_submodule(path)
        state[f"{path}.lora_A"] = layer.lora_A["default"].weight.detach()
        state[f"{path}.lora_B"] = layer.lora_B["default"].weight.detach()
    m.load_adapter_state_dict(state)
    return p, m


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_equals_peft_outputs_and_gradients(use_rslora: bool) -> None:
    p, m = lora_pair(use_rslora=use_rslora)
    x = torch.randn(5, 8)
    g = torch.randn(5, 4)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    (m(ours_x) * g).sum().backward()
    (p(theirs_x) * g).sum().backward()
    assert_close(ours_x.grad, theirs_x.grad)
    for path in ("encoder.0", "encoder.2", "head"):
        layer = p.base_model.model.get_submodule(path)
        assert_close(m.graph_module.get_parameter(f"{path}.lora_A").grad, layer.lora_A["default"].weight.grad)
        assert_close(m.graph_module.get_parameter(f"{path}.lora_B").grad, layer.lora_B["default"].weight.grad)
    with torch.no_grad():
        assert_close(m(x), p(x))


def test_lora_dropout_is_peft_dropout() -> None:
    """In training the branch input is dropped (same masks as PEFT's under the same seed, eager); the base
    layer sees the undropped input; in eval no dropout at all."""
    p, m = lora_pair(dropout=0.5)
    x = torch.randn(64, 8)
    with torch.no_grad():
        torch.manual_seed(7)
        theirs = p(x)
        torch.manual_seed(7)
        ours = m(x)
        assert_close(ours, theirs)
        p.eval(), m.eval()
        without = p(x)
        assert (ours - without).abs().max().item() > 1e-3       # dropout acted in training
        assert_close(m(x), without)
        assert_close(m(x), m(x))


def test_lora_fold_and_unmerged_export(tmp_path) -> None:
    p, m = lora_pair(dropout=0.2)
    x = torch.randn(6, 8)
    m.eval()
    expected = m(x)
    merged = m.export_graph(merge=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not [n for n in merged.graph.nodes if n.target is torch.ops.aten.dropout.default]
    assert_close(merged(x), expected)
    for merge in (True, False):
        assert graphopt.export(m, tmp_path / f"lora_{merge}.onnx", example_inputs=(x,), merge=merge).max_abs_diff < 1e-5
    assert_close(m.merged_module()(x), p.merge_and_unload()(x))


def test_lora_option_errors() -> None:
    for spec, word in [("lora(r=0)", "r"), ("lora(alpha=0)", "alpha"), ("lora(dropout=1.0)", "dropout")]:
        with pytest.raises(graphopt.OptionError, match=f"option {word}="):
            graphopt.compile(MLP(), methods=[spec])


# -- PEFT -> graphopt ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, config_name", PAIRS)
def test_peft_adapter_loads_into_graphopt(model_name: str, config_name: str, tmp_path) -> None:
    build, targets = MODELS[model_name]
    base = build()
    p = peft.get_peft_model(copy.deepcopy(base), CONFIGS[config_name](targets))
    p.save_pretrained(tmp_path)
    m = graphopt.from_peft(base, tmp_path, methods=["adamw(lr=1e-3)"], example_inputs=(TOKENS,), backend="eager")
    p.eval()
    expected = logits(p, TOKENS)
    assert_close(logits(m.eval(), TOKENS), expected)
    n_peft = sum(v.numel() for v in peft.utils.get_peft_model_state_dict(p).values())
    assert sum(v.numel() for v in m.adapter_state_dict().values()) == n_peft
    from_object = graphopt.from_peft(base, p, example_inputs=(TOKENS,), backend="eager")   # a PeftModel as such
    assert_close(logits(from_object.eval(), TOKENS), expected)


# -- graphopt -> PEFT ---------------------------------------------------------------------------------
SPECS = {"lora": "lora(r=4, alpha=8, dropout=0.1)", "hra": "hra(r=4)", "oftv2": "oftv2(block_size=8)",
         "oftv2-exact": "oftv2(block_size=8, neumann_terms=0)"}


def randomise(m, seed: int = 1, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.adapter_state_dict().values():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("model_name, spec", [(m, s) for m in MODELS for s in SPECS if m == "bert" or s == "lora"])
def test_graphopt_adapter_loads_into_peft(model_name: str, spec: str, tmp_path) -> None:
    build, targets = MODELS[model_name]
    base = build()
    globs = [f"*.{t}" for t in targets]
    m = compile_eager(base, [SPECS[spec].replace(")", f", targets={globs!r})"), "sgd(lr=0.1)"])
    randomise(m)
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert set(config["target_modules"]) == {n for n, mod in loaded.base_model.model.named_modules()
                                             if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer)}
    assert_close(logits(loaded, TOKENS), logits(m.eval(), TOKENS))


@pytest.mark.parametrize("spec, kind", [("hra(r=4, targets='*.c_fc')", "HRA"),
                                        ("oftv2(block_size=8, targets='*.c_fc')", "OFT")])
def test_hra_and_oft_on_gpt2_conv1d_are_refused_by_the_format(spec: str, kind: str, tmp_path) -> None:
    """PEFT's HRA and OFT refuse transformers Conv1D layers (GPT-2's projections)."""
    m = compile_eager(hf_gpt2(), [spec, "sgd(lr=0.1)"])
    with pytest.raises(graphopt.GraphoptError, match=f"PEFT's {kind} has no transformers Conv1D layers"):
        m.save_pretrained(tmp_path)


def test_pruned_sora_saves_as_lora_with_the_gate_folded(tmp_path) -> None:
    base = hf_bert()
    m = compile_eager(base, ["sora(r=4, targets=['*.query', '*.value'])", "sgd(lr=0.1)"])
    randomise(m, scale=0.3)
    with torch.no_grad():
        for name, p in m.graph_module.named_parameters():
            if name.endswith("sora_gate"):
                p[: 1 if "layer.0.attention.self.query" in name else 2] = 0   # ranks 3 and 2
    m.prune()
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3
    assert config["rank_pattern"] == {f"bert.encoder.layer.{i}.attention.self.{t}": 2
                                      for i in (0, 1) for t in ("query", "value")
                                      if (i, t) != (0, "query")}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_close(logits(loaded, TOKENS), logits(m.eval(), TOKENS))


class Wrapper(torch.nn.Module):
    """A user's module around the HF model (``submodule="model"``): returns the logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def test_save_pretrained_of_a_wrapper_with_submodule(tmp_path) -> None:
    base = hf_bert()
    m = compile_eager(Wrapper(base), ["lora(r=2, targets='*.query')", "sgd(lr=0.1)"])
    randomise(m)
    m.save_pretrained(tmp_path, submodule="model")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert_close(logits(loaded, TOKENS), m.eval()(TOKENS))
    back = graphopt.from_peft(Wrapper(base), tmp_path, example_inputs=(TOKENS,), submodule="model", backend="eager")
    with torch.no_grad():
        assert_close(back.eval()(TOKENS), m(TOKENS))


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, setting", [
    (peft.LoraConfig(r=2, target_modules=["query"], use_dora=True), "use_dora"),
    (peft.LoraConfig(r=2, target_modules=["query"], bias="lora_only"), "bias"),
    (peft.LoraConfig(r=2, target_modules=["query", "value"], rank_pattern={"value": 4}), "rank_pattern"),
    (peft.OFTConfig(r=0, oft_block_size=8, target_modules=["query"], coft=True), "coft"),
    (peft.OFTConfig(r=0, oft_block_size=8, target_modules=["query"], num_cayley_neumann_terms=2),
     "num_cayley_neumann_terms"),
    (peft.IA3Config(target_modules=["query"], feedforward_modules=[]), "peft_type"),
])
def test_unsupported_peft_settings_name_the_setting(config, setting: str, tmp_path) -> None:
    base = hf_bert()
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    with pytest.raises(graphopt.GraphoptError, match=f"PEFT setting {setting}="):
        graphopt.from_peft(base, tmp_path, example_inputs=(TOKENS,), backend="eager")


def test_oftv2_terms_without_peft_counterpart(tmp_path) -> None:
    m = compile_eager(hf_bert(), ["oftv2(block_size=8, neumann_terms=2, targets='*.query')", "sgd(lr=0.1)"])
    with pytest.raises(graphopt.GraphoptError, match="neumann_terms=2 has no PEFT OFT counterpart"):
        m.save_pretrained(tmp_path)


def test_from_peft_needs_example_inputs(tmp_path) -> None:
    with pytest.raises(graphopt.OptionError, match="example_inputs"):
        graphopt.from_peft(hf_bert(), tmp_path)


def test_from_peft_trains(tmp_path) -> None:
    base = hf_bert()
    peft.get_peft_model(copy.deepcopy(base), CONFIGS["lora"](["query"])).save_pretrained(tmp_path)
    labels = torch.tensor([0, 1, 2])
    m = graphopt.from_peft(base, tmp_path, methods=["adamw(lr=1e-2)"], example_inputs=(TOKENS,), backend="eager",
                           loss_fn=lambda out, y: F.cross_entropy(out.logits, y))
    assert set(n for n, p in m.graph_module.named_parameters() if p.requires_grad) == set(m.adapter_state_dict())
    def eval_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(m.eval()(TOKENS).logits, labels).item()

    before = eval_loss()
    m.train()
    for _ in range(10):
        m.step(TOKENS, labels)
    assert eval_loss() < before  # measured without dropout: training lowered the loss


# -- modules_to_save both ways ----------------------------------------------------------------------------
LABELS = torch.tensor([0, 1, 2])


def cross_entropy(out, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y)


def test_peft_modules_to_save_load_into_graphopt_and_train(tmp_path) -> None:
    """PEFT trains a LoRA plus the classifier (modules_to_save, dropout on); graphopt loads both, computes PEFT's
    eval logits, trains the classifier; the user's base model is left alone."""
    base = hf_bert()
    untouched = copy.deepcopy(base.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"],
                             modules_to_save=["classifier"])
    p = peft.get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-2)
    p.train()
    for _ in range(3):
        opt.zero_grad()
        p(TOKENS, labels=LABELS).loss.backward()
        opt.step()
    saved_classifier = p.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    assert (saved_classifier - base.classifier.weight).abs().max().item() > 1e-3   # PEFT trained it
    p.save_pretrained(tmp_path)
    p.eval()
    expected = logits(p, TOKENS)
    m = graphopt.from_peft(base, tmp_path, methods=["adamw(lr=1e-2)"], example_inputs=(TOKENS,), backend="eager",
                           loss_fn=cross_entropy)
    assert {"classifier.weight", "classifier.bias"} <= set(m.trainable_parameters())
    assert_close(m.trainable_parameters()["classifier.weight"].detach(), saved_classifier)
    assert_close(logits(m.eval(), TOKENS), expected)
    from_object = graphopt.from_peft(base, p, example_inputs=(TOKENS,), backend="eager")   # a live PeftModel
    assert_close(logits(from_object.eval(), TOKENS), expected)
    before = m.trainable_parameters()["classifier.weight"].detach().clone()
    m.train()
    for _ in range(3):
        m.step(TOKENS, LABELS)
    assert (m.trainable_parameters()["classifier.weight"].detach() - before).abs().max().item() > 1e-4
    for name, value in base.state_dict().items():
        assert torch.equal(value, untouched[name]), name
    both = graphopt.from_peft(base, tmp_path, example_inputs=(TOKENS,), backend="eager", trainable="bert.pooler")
    assert {n.rpartition(".")[0] for n in both.trainable_parameters() if "lora" not in n} == {
        "classifier", "bert.pooler.dense"}


@pytest.mark.parametrize("trainable, saved", [
    (["classifier"], ["classifier"]),
    pytest.param(["classifier.*"], ["classifier"], marks=pytest.mark.slow),
    pytest.param(["classifier", "bert.pooler"], ["bert.pooler", "classifier"], marks=pytest.mark.slow)])
def test_graphopt_trainable_modules_load_into_peft(trainable, saved, tmp_path) -> None:
    base = hf_bert()
    m = compile_eager(base, ["lora(r=4, alpha=8, dropout=0.1, targets=['*.query', '*.value'])", "adamw(lr=1e-2)"],
                      trainable=trainable, loss_fn=cross_entropy)
    m.train()
    for _ in range(3):
        m.step(TOKENS, LABELS)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == saved
    loaded = peft.PeftModel.from_pretrained(hf_bert(), tmp_path).eval()
    wrapper = loaded.base_model.model.classifier
    assert isinstance(wrapper, peft.utils.other.ModulesToSaveWrapper)
    trained = m.trainable_parameters()["classifier.weight"].detach()
    assert (trained - base.classifier.weight).abs().max().item() > 1e-4        # graphopt trained it
    assert_close(wrapper.modules_to_save["default"].weight.detach(), trained)
    assert_close(logits(loaded, TOKENS), logits(m.eval(), TOKENS))


def test_modules_to_save_of_a_wrapper_with_submodule(tmp_path) -> None:
    base = hf_bert()
    m = compile_eager(Wrapper(base), ["lora(r=2, targets='*.query')", "sgd(lr=0.1)"], trainable=["model.classifier"])
    randomise(m)
    m.save_pretrained(tmp_path, submodule="model")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert_close(logits(loaded, TOKENS), m.eval()(TOKENS))
    back = graphopt.from_peft(Wrapper(base), tmp_path, example_inputs=(TOKENS,), submodule="model", backend="eager")
    assert {"model.classifier.weight", "model.classifier.bias"} <= set(back.trainable_parameters())
    with torch.no_grad():
        assert_close(back.eval()(TOKENS), m(TOKENS))


@pytest.mark.parametrize("trainable, named", [(["classifier.bias"], "classifier.bias"),
                                              (["*.bias"], "bert.embeddings.LayerNorm.bias")])
def test_partial_trainable_modules_are_refused_by_save_pretrained(trainable, named: str, tmp_path) -> None:
    m = compile_eager(hf_bert(), ["lora(r=2, targets='*.query')", "sgd(lr=0.1)"], trainable=trainable)
    with pytest.raises(graphopt.GraphoptError, match=rf"base parameters .*{named}.* train, but not their whole "
                                                     r"modules.*train whole modules"):
        m.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_adapter_inside_a_module_to_save_is_refused(tmp_path) -> None:
    m = compile_eager(hf_bert(), ["lora(r=2, targets='classifier')", "sgd(lr=0.1)"], trainable=["classifier"])
    with pytest.raises(graphopt.GraphoptError, match="'classifier' lies inside module 'classifier'"):
        m.save_pretrained(tmp_path)
