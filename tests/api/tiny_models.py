"""Tiny real models (random init, no downloads) and summary-table parsing for the api tests."""

from __future__ import annotations

import re

import timm
import torch
from torch import nn

import frostline as fl


def vit(num_classes: int = 3) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, pretrained=False, num_classes=num_classes
    )


def vit_small_dims() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )


def convnext() -> nn.Module:
    return timm.create_model(
        "convnext_atto", pretrained=False, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=3
    )


def bert_config(**kw):
    from transformers import BertConfig

    base = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertConfig(**{**base, **kw})


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=50,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


class TiedLM(nn.Module):
    """An embedding and a head sharing one matrix (as GPT-2 and BERT LM heads do)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))).mean(dim=1))


def summary_text(model: fl.Model, **kwargs) -> str:
    lines: list[str] = []
    model.summary(print_fn=lines.append, **kwargs)
    return "\n".join(lines)


def total_of(text: str) -> int:
    m = re.search(r"^Total params: ([\d,]+)", text, re.MULTILINE)
    assert m, text
    return int(m.group(1).replace(",", ""))


def rows(text: str) -> list[tuple[int, str, int, str]]:
    """(indent level, label, param count, trainable column) of each table row."""
    lines = text.splitlines()
    rules = [i for i, ln in enumerate(lines) if ln and set(ln) == {"="}]
    assert len(rules) == 2, text
    out = []
    for ln in lines[rules[0] + 1 : rules[1]]:
        if not ln or set(ln) == {"-"}:
            continue
        cells = re.split(r"\s{3,}", ln.strip())
        indent = (len(ln) - len(ln.lstrip(" "))) // 2
        out.append((indent, cells[0], int(cells[-2].replace(",", "")), cells[-1]))
    return out
