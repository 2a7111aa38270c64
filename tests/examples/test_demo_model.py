"""The committed demo checkpoint (examples/demo_model) loads through the
server's and the client's loaders and writes words of its corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from libpipe.model import KVCachePool, ModelConfig, load_client_head, load_span

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL = EXAMPLES / "demo_model"
CORPUS = EXAMPLES / "corpus" / "genesis-kjv.txt"


def greedy(prompt: str, new_tokens: int, split: int) -> str:
    """Greedy decoding with two spans, as two servers would hold them, and
    KV-cached sessions, as servers run them."""
    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    head = load_client_head(MODEL, progress=False)
    layers = head.config.num_hidden_layers
    spans = [
        load_span(MODEL, 0, split, progress=False),
        load_span(MODEL, split, layers, progress=False),
    ]
    pool = KVCachePool(64 << 20)
    ids = tok.encode(prompt).ids
    sessions = [s.open_session(pool, batch=1, max_length=len(ids) + new_tokens) for s in spans]
    step = torch.tensor([ids])
    for _ in range(new_tokens):
        hidden = head.embed(step)
        for session in sessions:
            hidden = session.step(hidden)
        token = int(head.logits(hidden)[0, -1].argmax())
        ids.append(token)
        step = torch.tensor([[token]])
    return tok.decode(ids)


def test_checkpoint_is_in_the_hugging_face_layout() -> None:
    config = ModelConfig.from_file(MODEL)
    raw = json.loads((MODEL / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert config.num_hidden_layers >= 4  # enough blocks to spread over a demo swarm
    assert Tokenizer.from_file(str(MODEL / "tokenizer.json")).get_vocab_size() == config.vocab_size
    assert (MODEL / "model.safetensors").stat().st_size < 8 << 20


def test_greedy_text_is_made_of_the_corpus_words() -> None:
    prompt = "And God said"
    text = greedy(prompt, 40, split=3)
    continuation = text[len(prompt) :]
    words = re.findall(r"[A-Za-z]+", continuation)
    assert len(words) >= 10, text
    known = set(re.findall(r"[A-Za-z]+", CORPUS.read_text(encoding="utf-8")))
    # An untrained model of this vocabulary writes fragments of words, a
    # barely trained one repeats ", and": this one writes many of the
    # corpus's own words.
    assert sum(w in known for w in words) >= 0.9 * len(words), text
    assert len(set(words)) >= 8, text
