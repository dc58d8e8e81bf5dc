"""Tiny models built from configs in code (no download), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HIDDEN = 64
INTER = 128


def tiny_llama(tie: bool = False, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral() -> MistralForCausalLM:
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_gemma3(window: int = 8) -> Gemma3ForCausalLM:
    """Gemma 3's text decoder: sliding-window blocks beside a global one (window < the tests' sequences),
    one key/value head, a head_dim that is not hidden / heads, a scaled tied embedding."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        sliding_window=window, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


class MLP(nn.Module):
    """Plain custom MLP: fc1 → relu → fc2 → relu → fc3."""

    def __init__(self, dims: tuple[int, ...] = (32, 64, 64, 16)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.fc2 = nn.Linear(dims[1], dims[2])
        self.fc3 = nn.Linear(dims[2], dims[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class AttentionBlock(nn.Module):
    """A hand-written attention block: q/k/v read the same normed input, then out, then an MLP."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8.0, dim=-1)
        x = x + self.out(att @ self.v(h))
        return x + self.down(torch.relu(self.up(x)))


class DataDependent(nn.Module):
    """A forward with data-dependent Python control flow: no graph route can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = self.b(h)
        return self.c(h)


class SharedLayer(nn.Module):
    """The same Linear object used twice in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.shared = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.shared(torch.relu(self.shared(h)))
        return self.out(h)


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class OddWidth(nn.Module):
    """in_features not divisible by the group size (100 with g=64)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(100, 40)
        self.head = nn.Linear(40, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for ``ids``, without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits
