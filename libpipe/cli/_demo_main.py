"""`libpipe demo` from start to end: swarm up, generate, compare, swarm down."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from ..client import Client
from ..errors import DeadlineExceededError, sole_error
from ..model import ModelConfig
from ..net import short_peer_id
from ._demo_generate import Run, Screen, generate, local_greedy, summary
from ._demo_swarm import LocalSwarm

# Gossip among four local servers settles in a second or two with the
# `local` preset; this bounds a swarm that never does.
DISCOVERY_TIMEOUT = 60.0
# The client asks its peer again this often while waiting for the others.
DISCOVERY_REFRESH = 0.5


def run_swarm_demo(
    model_dir: Path,
    *,
    servers: int,
    prompt: str,
    tokens: int,
    kill_after: int | None,
    bundled: bool = False,
) -> int:
    screen = Screen()
    config = ModelConfig.from_file(model_dir)
    # Half the model each: two hops per token, and with three or more
    # servers some blocks held twice, so one server can die.
    num_blocks = max(1, config.num_hidden_layers // 2)
    about = " (the bundled model: tiny, trained on Genesis, which it mostly recites)"
    plan = "then a client streams text through them"
    if kill_after is not None:
        plan += f"; after {kill_after} tokens a server on its route is killed, and it carries on"
    screen.note(
        f"model {config.model_id}: {config.num_hidden_layers} transformer blocks, hidden "
        f"size {config.hidden_size}, vocabulary {config.vocab_size}{about if bundled else ''}\n"
        f"starting a private swarm: a fresh CA, {servers} libpipe-server processes on "
        f"127.0.0.1 talking mutual TLS 1.3, each holding {num_blocks} of the "
        f"{config.num_hidden_layers} blocks (which ones, they agree by gossip)\n{plan}\n"
    )
    began = time.perf_counter()
    with LocalSwarm.start(model_dir, servers, num_blocks) as swarm:
        for s in swarm.servers:
            screen.note(
                f"  server {short_peer_id(s.peer_id)} at {s.address} chose blocks "
                f"{s.span[0]}:{s.span[1]}\n"
            )
        screen.note(f"  all serving after {time.perf_counter() - began:.1f} s\n\n")
        try:
            run = trio.run(_client_side, swarm, model_dir, prompt, tokens, kill_after, screen)
        except BaseExceptionGroup as group:
            # A typed error from inside the client's nurseries arrives
            # wrapped; unwrapped, the CLI prints it as the user's answer.
            raise sole_error(group) from None
        screen.note("\n" + "\n".join(summary(run)) + "\n")
        same = _compare(screen, model_dir, run)
        screen.note("\nshutting the swarm down (SIGTERM: each server drains, then exits)\n")
        for stopped in swarm.stop():
            status = "exited 0" if stopped.returncode == 0 else f"exit status {stopped.returncode}"
            screen.note(f"  server {short_peer_id(stopped.peer_id)}: {status}\n")
        if run.killed is not None:
            screen.note(f"  server {short_peer_id(run.killed[0])}: killed earlier (SIGKILL)\n")
    screen.note(f"done in {time.perf_counter() - began:.1f} s\n")
    return 0 if same else 1


async def _client_side(
    swarm: LocalSwarm,
    model_dir: Path,
    prompt: str,
    tokens: int,
    kill_after: int | None,
    screen: Screen,
) -> Run:
    seed = swarm.servers[0].address
    async with Client(
        model_dir,
        [seed],
        identity=swarm.client_identity,
        refresh_interval=DISCOVERY_REFRESH,
    ) as client:
        await _wait_for_swarm(client, len(swarm.servers))
        screen.note(
            f"client: told of one peer ({seed}), learned all {len(client.view.servers)} "
            "servers from it (the swarm view gossip keeps):\n"
            "  server    blocks  decode speed the server measured  round trip from the client\n"
        )
        view = client.view
        for entry in sorted(view.servers.values(), key=lambda e: (e.span, e.peer_id)):
            screen.note(
                f"  {short_peer_id(entry.peer_id)}  {entry.span[0]}:{entry.span[1]}     "
                f"{entry.throughput_decode:7.1f} tokens/s{'':>24}"
                f"{view.rtt_of(entry.peer_id) * 1e3:5.1f} ms\n"
            )

        return await generate(client, prompt, tokens, kill_after, swarm.kill, screen)


async def _wait_for_swarm(client: Client, expected: int) -> None:
    with trio.move_on_after(DISCOVERY_TIMEOUT):
        while len(client.view.servers) < expected:
            await trio.sleep(DISCOVERY_REFRESH / 2)
        return
    raise DeadlineExceededError(
        f"the client learned {len(client.view.servers)} of {expected} servers in "
        f"{DISCOVERY_TIMEOUT:g} s"
    )


def _compare(screen: Screen, model_dir: Path, run: Run) -> bool:
    """Whether the swarm wrote what the model writes alone (it must: see
    client/_session.py); said on screen either way."""
    expected = local_greedy(model_dir, run.prompt_ids, len(run.tokens))
    if expected == run.tokens:
        screen.note(
            "  same tokens as the model run in this process without a swarm"
            + (": failover lost nothing\n" if run.killed is not None else "\n")
        )
        return True
    first = next(i for i, (a, b) in enumerate(zip(expected, run.tokens, strict=True)) if a != b)
    screen.alert(f"  differs from the local run from token {first} on\n")
    return False
