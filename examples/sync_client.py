"""libpipe from plain synchronous code (a script, a notebook, a web handler).

    python examples/sync_client.py --model examples/demo_model \\
        --peer 10.0.0.5:31337 --identity ~/libpipe/client

``libpipe.SyncClient`` runs the trio client in a thread of its own and
blocks the caller on each call; errors arrive typed, as with ``Client``.
This script shows what most programs do: generate a whole answer, stream
one, stop at a string, and drive an inference session step by step to
read the model's next-token distribution.
"""

from __future__ import annotations

import argparse

import torch

import libpipe


def main() -> None:
    parser = argparse.ArgumentParser(description="Use a libpipe swarm from synchronous code.")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--peer", action="append", required=True, help="HOST:PORT of a member")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--identity", help="identity directory (libpipe ca issue)")
    who.add_argument("--insecure", action="store_true", help="plaintext, local development")
    parser.add_argument("--prompt", default="And God said")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per generation")
    parser.add_argument("--stop", default=".", help="where the third generation ends")
    args = parser.parse_args()

    with libpipe.SyncClient(
        args.model, args.peer, identity=args.identity, insecure=args.insecure
    ) as client:
        # 1. A whole answer at once (greedy).
        ids = client.generate(args.prompt, max_new_tokens=args.tokens)
        print("generate:", repr(args.prompt + client.decode(ids)))

        # 2. Sampled, token by token, as they come.
        tokens: list[int] = []
        for token in client.stream(
            args.prompt, max_new_tokens=args.tokens, temperature=0.8, seed=1
        ):
            tokens.append(token)
        print("stream:  ", repr(args.prompt + client.decode(tokens)))

        # 3. Greedy again, ending early at a string (the token completing it
        #    is kept). Leaving a stream's loop with `break` ends it early too.
        ids = client.generate(args.prompt, max_new_tokens=args.tokens, stop=[args.stop])
        print("until:   ", repr(args.prompt + client.decode(ids)))

        # 4. The session under both: the servers keep the KV cache between steps.
        prompt_ids = client.encode(args.prompt)
        with client.inference_session(max_length=len(prompt_ids) + 1) as session:
            logits = session.step(prompt_ids)  # [1, T, vocab]
            probs = torch.softmax(logits[0, -1], dim=-1)
            top = torch.topk(probs, 5)
            guesses = ", ".join(
                f"{client.decode([int(i)])!r} {float(p):.2f}"
                for p, i in zip(top.values, top.indices, strict=True)
            )
            print(f"next token after {args.prompt!r}: {guesses}")


if __name__ == "__main__":
    main()
