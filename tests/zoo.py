"""The model zoo: tiny random-init ``transformers`` models from their configs (default dropout, no downloads),
across decoder LMs, encoders, encoder-decoders, vision CNNs and transformers, and audio.

Each :class:`ZooModel` builds the model, a batch (keyword inputs as users pass them, and a target) and the
loss on the model's own ``ModelOutput``. Sizes are small (hidden 64, 2 layers, vocab 256) and chosen so
every method's defaults apply (widths are multiples of oftv2's block size 32). timm is not in the zoo: it
imports torchvision, which fails to import beside the CPU torch build; the vision models here are
``transformers``' own (ResNet, ConvNeXt, EfficientNet, MobileNetV2, ViT, Swin), whose code does not import
torchvision. EfficientNet's convs and batch norms are re-initialised (``_conv_reset``). One default is
changed: wav2vec2's SpecAugment (``mask_time_prob``) draws its masks with numpy in Python, so any captured
graph (torch.export or dynamo) would hold one fixed mask; it is turned off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH, LABELS = 256, 8, 4, 3
HIDDEN, HEADS, FFN, LAYERS = 64, 4, 128, 2
IMAGE, AUDIO = 32, 1600


@dataclass(frozen=True)
class ZooModel:
    """One architecture: ``build(seed)`` the model, ``batch(seed)`` its keyword inputs and target, ``loss``
    on ``(output, target)``; ``family`` for the matrix; ``blocks``: the module glob of its layers (for the
    layer-dropping tests; None: the blocks are found in the graph); ``capture``: ``"dynamo"`` for a model
    ``torch.export`` cannot capture (wav2vec2's LayerDrop draws ``torch.rand([])`` and branches on it);
    ``options``: the model's own method options over the methods' examples (a learning rate the model needs)."""

    name: str
    family: str
    build: Callable[[int], nn.Module]
    batch: Callable[[int], tuple[dict[str, torch.Tensor], torch.Tensor]]
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    blocks: str | None = None
    capture: str = "export"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return factory()
    return build


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position of ``output.logits (B, T, V)``."""
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def class_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, target)


def lm_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sequences counting up by one (mod the vocabulary); the target is the next token."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids}, (ids + 1) % VOCAB


def token_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids with an attention mask (one padded row); the label is the first token mod ``LABELS``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids[:, 0] % LABELS


def seq2seq_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Copy task: the decoder reads the source shifted right (start token 0) and predicts the source."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    decoder = torch.cat([torch.zeros(BATCH, 1, dtype=torch.long), ids[:, :-1]], dim=1)
    return {"input_ids": ids, "decoder_input_ids": decoder}, ids


def image_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The label is the channel with the largest mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    y = torch.randint(0, LABELS, (BATCH,), generator=g)
    x[torch.arange(BATCH), y] += 1.0
    return {"pixel_values": x}, y


def audio_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Raw waveforms; the label is which of three frequencies the tone has."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, LABELS, (BATCH,), generator=g)
    t = torch.arange(AUDIO) / 16000.0
    x = torch.sin(2 * torch.pi * (200.0 * (1 + y[:, None])) * t) + 0.1 * torch.randn(BATCH, AUDIO, generator=g)
    return {"input_values": x}, y


def features_batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Log-mel-like features ``(B, mel bins, frames)`` for Whisper's encoder; the label is a band's energy."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, LABELS, (BATCH,), generator=g)
    x = torch.randn(BATCH, 16, 32, generator=g)
    x[torch.arange(BATCH), y * 4] += 2.0
    return {"input_features": x}, y


def _t():
    import transformers

    return transformers


def _decoder(config: str, model: str, **options: Any) -> Callable[[int], nn.Module]:
    def factory() -> nn.Module:
        t = _t()
        return getattr(t, model)(getattr(t, config)(vocab_size=VOCAB, use_cache=False, **options))
    return _seeded(factory)


def _llama_like(config: str, model: str, **extra: Any) -> Callable[[int], nn.Module]:
    return _decoder(config, model, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, **extra)


def _encoder(config: str, model: str, **options: Any) -> Callable[[int], nn.Module]:
    def factory() -> nn.Module:
        t = _t()
        sizes = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                 "intermediate_size": FFN, "max_position_embeddings": 64}
        return getattr(t, model)(getattr(t, config)(vocab_size=VOCAB, num_labels=LABELS, **{**sizes, **options}))
    return _seeded(factory)


def _vision(config: str, model: str, **options: Any) -> Callable[[int], nn.Module]:
    def factory() -> nn.Module:
        t = _t()
        return getattr(t, model)(getattr(t, config)(num_labels=LABELS, **options))
    return _seeded(factory)


def _conv_reset(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """EfficientNet's HF init draws conv and batch-norm weights with std 0.02, so a random-init model's features
    vanish (~1e-35 at the classifier) and a frozen base passes nothing to train on: they get PyTorch's init."""
    def rebuilt(seed: int = 0) -> nn.Module:
        model = build(seed)
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.reset_parameters()
        return model
    return rebuilt


_SEQ2SEQ = {"vocab_size": VOCAB, "use_cache": False, "decoder_start_token_id": 0, "pad_token_id": 0}

ZOO: dict[str, ZooModel] = {m.name: m for m in (
    # decoder LMs
    ZooModel("gpt2", "decoder", _decoder("GPT2Config", "GPT2LMHeadModel", n_positions=64, n_embd=HIDDEN,
                                         n_layer=LAYERS, n_head=HEADS, bos_token_id=0, eos_token_id=0),
             lm_batch, lm_loss, "transformer.h.*"),
    ZooModel("llama", "decoder", _llama_like("LlamaConfig", "LlamaForCausalLM"), lm_batch, lm_loss, "model.layers.*"),
    ZooModel("mistral", "decoder", _llama_like("MistralConfig", "MistralForCausalLM"), lm_batch, lm_loss,
             "model.layers.*"),
    ZooModel("qwen2", "decoder", _llama_like("Qwen2Config", "Qwen2ForCausalLM"), lm_batch, lm_loss, "model.layers.*"),
    ZooModel("gemma", "decoder", _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=16), lm_batch, lm_loss,
             "model.layers.*"),
    ZooModel("phi", "decoder", _decoder("PhiConfig", "PhiForCausalLM", hidden_size=HIDDEN, intermediate_size=FFN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        max_position_embeddings=64), lm_batch, lm_loss, "model.layers.*"),
    ZooModel("gpt_neox", "decoder", _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=HIDDEN,
                                             intermediate_size=FFN, num_hidden_layers=LAYERS,
                                             num_attention_heads=HEADS, max_position_embeddings=64),
             lm_batch, lm_loss, "gpt_neox.layers.*"),
    ZooModel("opt", "decoder", _decoder("OPTConfig", "OPTForCausalLM", hidden_size=HIDDEN, ffn_dim=FFN,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        max_position_embeddings=64, word_embed_proj_dim=HIDDEN),
             lm_batch, lm_loss, "model.decoder.layers.*"),
    ZooModel("falcon", "decoder", _decoder("FalconConfig", "FalconForCausalLM", hidden_size=HIDDEN,
                                           num_hidden_layers=LAYERS, num_attention_heads=HEADS),
             lm_batch, lm_loss, "transformer.h.*"),
    # encoders
    ZooModel("bert", "encoder", _encoder("BertConfig", "BertForSequenceClassification"), token_batch, class_loss,
             "bert.encoder.layer.*"),
    ZooModel("roberta", "encoder", _encoder("RobertaConfig", "RobertaForSequenceClassification",
                                            max_position_embeddings=66, pad_token_id=0),
             token_batch, class_loss, "roberta.encoder.layer.*"),
    ZooModel("distilbert", "encoder", _encoder("DistilBertConfig", "DistilBertForSequenceClassification",
                                               dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN),
             token_batch, class_loss, "distilbert.transformer.layer.*"),
    ZooModel("albert", "encoder", _encoder("AlbertConfig", "AlbertForSequenceClassification", embedding_size=32),
             token_batch, class_loss, None),
    ZooModel("electra", "encoder", _encoder("ElectraConfig", "ElectraForSequenceClassification", embedding_size=32),
             token_batch, class_loss, "electra.encoder.layer.*"),
    # encoder-decoders
    ZooModel("t5", "encoder-decoder", _seeded(lambda: _t().T5ForConditionalGeneration(_t().T5Config(
        d_model=HIDDEN, d_kv=16, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, **_SEQ2SEQ))),
        seq2seq_batch, lm_loss, "*.block.*"),
    ZooModel("bart", "encoder-decoder", _seeded(lambda: _t().BartForConditionalGeneration(_t().BartConfig(
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=64,
        **_SEQ2SEQ))), seq2seq_batch, lm_loss, "model.*.layers.*"),
    # vision CNNs
    ZooModel("resnet", "vision-cnn", _vision("ResNetConfig", "ResNetForImageClassification", embedding_size=32,
                                             hidden_sizes=[32, 64], depths=[2, 1], layer_type="basic"),
             image_batch, class_loss, None),
    ZooModel("convnext", "vision-cnn", _vision("ConvNextConfig", "ConvNextForImageClassification",
                                               hidden_sizes=[32, 64], depths=[1, 1], num_stages=2),
             image_batch, class_loss, None),
    ZooModel("efficientnet", "vision-cnn", _conv_reset(_vision(
        "EfficientNetConfig", "EfficientNetForImageClassification", image_size=IMAGE, width_coefficient=0.25,
        depth_coefficient=0.5, hidden_dim=320)), image_batch, class_loss, None),
    ZooModel("mobilenet_v2", "vision-cnn", _vision("MobileNetV2Config", "MobileNetV2ForImageClassification",
                                                   image_size=IMAGE, depth_multiplier=0.25),
             image_batch, class_loss, None,
             # its classifier dropout of 0.8 on four images: torch.optim.SGD at lr 0.1 diverges on it in eager
             # PyTorch too (2 of 3 seeds), at 0.01 it trains
             options={"sgd": {"lr": 0.01}}),
    # vision transformers
    ZooModel("vit", "vision-transformer", _vision("ViTConfig", "ViTForImageClassification", image_size=IMAGE,
                                                  patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS, intermediate_size=FFN),
             image_batch, class_loss, "vit.layers.*"),
    ZooModel("swin", "vision-transformer", _vision("SwinConfig", "SwinForImageClassification", image_size=IMAGE,
                                                   patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                                   window_size=4),
             image_batch, class_loss, "swin.encoder.layers.*.blocks.*"),
    # audio
    ZooModel("wav2vec2", "audio", _vision("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", vocab_size=VOCAB,
                                          hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          intermediate_size=FFN, conv_dim=(32, 32), conv_stride=(5, 4),
                                          conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                          num_conv_pos_embedding_groups=4, classifier_proj_size=32,
                                          mask_time_prob=0.0),
             audio_batch, class_loss, "wav2vec2.encoder.layers.*", capture="dynamo"),
    ZooModel("whisper", "audio", _vision("WhisperConfig", "WhisperForAudioClassification", vocab_size=VOCAB,
                                         num_mel_bins=16, d_model=HIDDEN, encoder_layers=LAYERS,
                                         encoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                         max_source_positions=16, classifier_proj_size=32,
                                         pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0),
             features_batch, class_loss, "encoder.layers.*"),
)}
