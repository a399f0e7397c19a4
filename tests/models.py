"""The test models shared by several test files: small hand-written models, and tiny random-init
third-party (``transformers``) models built from configs (no downloads).

Each ``transformers`` builder returns an ``nn.Module`` whose forward returns a plain logits tensor (so
``loss_fn`` gets a tensor), with dropout off so a captured step and the eager model see the same numbers.
Configs are small: 2 layers, hidden 64, vocab 256.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    """Two hidden layers with named submodules, so module paths are readable (``encoder.0``, ``head``)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ResidualBlock(nn.Module):
    """``x + dropout(W₂ gelu(W₁ x))``."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(width, width), nn.Linear(width, width), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(x))))


class ResidualMLP(nn.Module):
    """A stem ``Linear``, residual blocks with dropout (on, as users train), a head: every built-in method
    applies to it (tract on the stem, adapters on any linear layer, layerdrop on the blocks; widths are
    multiples of oftv2's default block size 32)."""

    def __init__(self, d_in: int = 32, width: int = 64, d_out: int = 4, blocks: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, dropout) for _ in range(blocks)])
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.gelu(self.stem(x))))


VOCAB = 256
SEQ = 8
NUM_LABELS = 3


class LogitsOnly(nn.Module):
    """Wraps a ``transformers`` model so its forward returns ``output.logits`` (a tensor, not a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def tiny_bert(seed: int = 0) -> nn.Module:
    """``BertForSequenceClassification``: 2 layers, hidden 64, 4 heads, vocab 256, 3 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=NUM_LABELS,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LogitsOnly(BertForSequenceClassification(config))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """``GPT2LMHeadModel``: 2 layers, hidden 64, 4 heads, vocab 256, ``use_cache=False``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LogitsOnly(GPT2LMHeadModel(config))


def tiny_resnet(seed: int = 0) -> nn.Module:
    """``ResNetForImageClassification``: basic blocks, depths (2, 2), widths (16, 32), 3 labels."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2],
                          layer_type="basic", num_labels=NUM_LABELS)
    return LogitsOnly(ResNetForImageClassification(config))


# -- default configs (dropout on), returning the models' own ModelOutputs --------------------------------------
def default_bert(seed: int = 0) -> nn.Module:
    """``BertForSequenceClassification`` with BERT's default dropout (0.1), tiny: 2 layers, hidden 64, 3 labels."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    max_position_embeddings=64, num_labels=NUM_LABELS))


def default_gpt2(seed: int = 0) -> nn.Module:
    """``GPT2LMHeadModel`` with GPT-2's default dropout (0.1), tiny: 2 layers, hidden 64, vocab 256."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      use_cache=False, bos_token_id=0, eos_token_id=0))


def default_vit(seed: int = 0) -> nn.Module:
    """``ViTForImageClassification``, tiny (16×16 images, patches of 4); ViT's default dropout is 0, so its
    two dropout probabilities are set to 0.1 to exercise the switch."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=128, num_labels=NUM_LABELS,
                                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


def default_llama(seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM``, tiny (grouped-query attention, 2 key/value heads); Llama's default attention
    dropout is 0, so it is set to 0.1 to exercise the switch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, use_cache=False, attention_dropout=0.1))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


class TorchvisionStyleResNet(nn.Module):
    """A torchvision-style ResNet (stem, two stages of basic blocks, pooling) with dropout 0.2 before the head."""

    def __init__(self, classes: int = NUM_LABELS) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.dropout, self.fc = nn.Dropout(0.2), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.dropout(h.mean((2, 3))))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position: ``logits (B, T, V)``, ``target (B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@dataclass(frozen=True)
class RealModel:
    """One model of the real-model matrix: builder, a batch maker, the loss, and names for the methods."""

    name: str
    build: Callable[[int], nn.Module]
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    adapter_targets: tuple[str, ...]   # targets globs for hra / oftv2 / sora (attention and MLP projections)
    blocks: str | None                 # layerdrop's blocks glob (transformer layers); None: found in the graph
    first_layer: str | None            # tract's layer: None = its default (must be a Conv/Linear)


def token_batch(batch: int = 8, seed: int = 0, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic classification task: the label is the first token mod ``NUM_LABELS``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return x, x[:, 0] % NUM_LABELS


def lm_batch(batch: int = 8, seed: int = 0, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic LM task: sequences count up by one mod the vocabulary; target = next token."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    x = (start + torch.arange(seq)) % VOCAB
    return x, (x + 1) % VOCAB


def image_batch(batch: int = 8, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic image task: the label is the channel with the largest mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    x[torch.arange(batch), y] += 1.0
    return x, y


BERT = RealModel("bert", tiny_bert, token_batch, F.cross_entropy,
                 ("*.attention.self.query", "*.attention.self.value", "*.intermediate.dense"),
                 "model.bert.encoder.layer.*", None)
GPT2 = RealModel("gpt2", tiny_gpt2, lm_batch, lm_loss, ("*.attn.c_attn", "*.mlp.c_fc"), "model.transformer.h.*", None)
RESNET = RealModel("resnet", tiny_resnet, image_batch, F.cross_entropy, ("*.classifier.1",),
                   None, "model.resnet.embedder.embedder.convolution")
MODELS = {m.name: m for m in (BERT, GPT2, RESNET)}
