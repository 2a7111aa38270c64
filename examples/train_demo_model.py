"""Train the small Llama-format model that `libpipe demo` serves, on CPU.

    .venv/bin/python examples/train_demo_model.py [--steps N] [--out DIR]

The demo needs a model whose output a person can read, and no weights can
be downloaded where libpipe is built, so the project trains its own: a
byte-level BPE tokenizer (the ``tokenizers`` package) and an 8-block Llama
on the Book of Genesis (King James Version, public domain; see
examples/corpus/NOTICE). It is small enough to train in minutes on one CPU
core (10 on a busy one) and to commit (about 4 MB in fp16); it mostly
recites its text, which is what a demo wants: readable sentences, so a
wrong activation anywhere in the swarm shows at once as garbage.

The model is built from libpipe's own block and head modules
(``libpipe.model.BlockSpan`` and ``ClientHead``), trained, and written in the
Hugging Face layout: ``config.json``, ``model.safetensors`` (tensor names as
transformers writes them) and ``tokenizer.json``. The script then reads the
checkpoint back through ``load_span`` / ``load_client_head``, the loaders
block servers use, and generates from a prompt.

Fixed seed, one thread: the same torch build on the same CPU gives the
same checkpoint. (One thread, not two: on a machine shared with other work,
two threads that wait on each other train slower than one.)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from libpipe.model import BlockSpan, ClientHead, ModelConfig, load_client_head, load_span

HERE = Path(__file__).resolve().parent
END_OF_TEXT = "<|endoftext|>"

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "torch_dtype": "float16",
    "_name_or_path": "libpipe-demo-genesis",
}


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any input encodes (no unknown tokens) and every id
    sequence decodes back to text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok


class DemoModel(torch.nn.Module):
    """Head and blocks together, for training only; saved as separate tensors."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head = ClientHead(config)
        self.blocks = BlockSpan(
            config, 0, config.num_hidden_layers, device=torch.device("cpu"), dtype=torch.float32
        )
        std = CONFIG["initializer_range"]
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            # GPT-2's scaling: each residual branch's output projection is
            # shrunk so the stream's variance does not grow with depth.
            scale = (
                1 / math.sqrt(2 * config.num_hidden_layers)
                if "o_proj" in name or "down_proj" in name
                else 1.0
            )
            torch.nn.init.normal_(p, std=std * scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.blocks(self.head.embed(ids)))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the names transformers gives them."""
        out = {
            "model.embed_tokens.weight": self.head.embed_tokens.weight,
            "model.norm.weight": self.head.norm.weight,
            "lm_head.weight": self.head.lm_head.weight,
        }
        for name, t in self.blocks.layers.state_dict().items():
            index, rest = name.split(".", 1)
            out[f"model.layers.{index}.{rest}"] = t
        return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``length + 1`` tokens: inputs and targets."""
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


@torch.no_grad()
def mean_loss(model: DemoModel, data: torch.Tensor, length: int) -> float:
    windows = data[: (data.numel() - 1) // length * length + 1]
    ids = windows[:-1].view(-1, length)
    targets = windows[1:].view(-1, length)
    logits = model(ids)
    return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    tok = train_tokenizer(text, CONFIG["vocab_size"])
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    # The last chapter is held out: its loss says how much is recital.
    split = text.rstrip("\n").rfind("\n\n")
    n_val = len(tok.encode(text[split:]).ids)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    print(
        f"{len(text)} characters -> {ids.numel()} tokens "
        f"({len(text) / ids.numel():.2f} chars/token); held out {n_val}"
    )

    config = ModelConfig.from_dict(CONFIG, name=CONFIG["_name_or_path"])
    model = DemoModel(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        # linear warm-up, then cosine decay to a tenth
        frac = min(1.0, step / warmup)
        progress = max(0.0, (step - warmup) / max(1, args.steps - warmup))
        lr = args.lr * frac * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        window = batches(train_ids, args.batch, args.length, gen)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  "
                f"held-out {mean_loss(model, val_ids, args.length):.3f}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:.0f} s"
            )
    save(model, tok, Path(args.out))


def save(model: DemoModel, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    print(f"checkpoint written to {out}")


@torch.no_grad()
def generate(model_dir: Path, prompt: str, tokens: int, temperature: float = 0.0) -> str:
    """Read the checkpoint back as a server and a client would and continue
    ``prompt``: greedy at temperature 0, else sampled (seeded)."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    head = load_client_head(model_dir, progress=False)
    span = load_span(model_dir, 0, head.config.num_hidden_layers, progress=False)
    gen = torch.Generator().manual_seed(0)
    ids = tok.encode(prompt).ids
    for _ in range(tokens):
        context = torch.tensor([ids[-head.config.max_position_embeddings :]])
        logits = head.logits(span(head.embed(context)))[0, -1]
        if temperature == 0.0:
            ids.append(int(logits.argmax()))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tok.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", default=str(HERE / "corpus" / "genesis-kjv.txt"))
    parser.add_argument("--out", default=str(HERE / "demo_model"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--prompt", default="And God said")
    args = parser.parse_args()
    for name in ("steps", "batch", "length", "threads", "log_every"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be at least 1, got {getattr(args, name)}")
    train(args)
    out = Path(args.out)
    print("\ngreedy:  ", generate(out, args.prompt, 60))
    print("sampled: ", generate(out, args.prompt, 60, temperature=0.8))


if __name__ == "__main__":
    main()
