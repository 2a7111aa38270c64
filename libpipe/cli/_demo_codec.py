"""`libpipe demo --codec`: a real activation through the wire codec.

What travels between block servers is the residual stream after a span of
blocks. This makes one for real (a small random Llama checkpoint written to
a temp dir, read back through the server's own loader, a prompt pushed
through its blocks), then sends it through a pair of ``WireConnection``s
the way net/ drives them, once with compression off and once on, and
prints what each costs in bytes and time. Plain zstd on the unshuffled fp16
bytes is measured beside it, to show what the byte-shuffle buys.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..wire import WireConnection

# The checkpoint is small enough to write in a second, wide enough that a
# prompt's activation (TOKENS x HIDDEN fp16 = 256 KiB) passes the codec's
# 64 KiB threshold for trying compression, as a real prefill does.
HIDDEN = 256
LAYERS = 4
TOKENS = 512
SEED = 0


@dataclass(frozen=True)
class CodecRow:
    """One way of putting the activation on the wire."""

    name: str
    nbytes: int
    seconds: float  # encode + decode, best of several; 0 where not timed


def best_of(fn: Callable[[], object], repeat: int = 7) -> float:
    """Seconds per call, the fastest of ``repeat``: the figure least disturbed
    by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_activation(model_dir: Path) -> tuple[torch.Tensor, float]:
    """The output of every block of the checkpoint for a TOKENS-long prompt,
    cast for the wire, and the seconds the forward pass took."""
    import torch

    from ..model import load_client_head, load_span, write_random_checkpoint
    from ..wire import cast_for_wire

    write_random_checkpoint(
        model_dir,
        "llama",
        seed=SEED,
        overrides={
            "hidden_size": HIDDEN,
            "intermediate_size": HIDDEN * 8 // 3 // 16 * 16,
            "num_hidden_layers": LAYERS,
        },
    )
    head = load_client_head(model_dir, progress=False)
    span = load_span(model_dir, 0, LAYERS, progress=False)
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, head.config.vocab_size, (1, TOKENS), generator=gen)
    with torch.no_grad():
        hidden = head.embed(prompt)
        start = time.perf_counter()
        out = span(hidden)
        seconds = time.perf_counter() - start
    return cast_for_wire(out), seconds


def connected_pair(compression: bool) -> tuple[WireConnection, WireConnection]:
    """Two codecs back to back, Hellos exchanged and one stream open."""
    from ..wire import FEATURE_ZSTD, Hello, Role, StreamOpen, WireConnection

    dialer = WireConnection(Role.DIALER, compression=compression)
    acceptor = WireConnection(Role.ACCEPTOR, compression=compression)
    features = frozenset({FEATURE_ZSTD}) if compression else frozenset()
    for src, dst in ((dialer, acceptor), (acceptor, dialer)):
        for buf in src.send(Hello(1, src.role.value, src.role.value, "demo", features)):
            dst.receive_data(buf)
        dst.next_event()
    for buf in dialer.send(StreamOpen(1, "demo")):
        acceptor.receive_data(buf)
    acceptor.next_event()
    return dialer, acceptor


def send_through(
    sender: WireConnection, receiver: WireConnection, tensor: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """One StreamData carrying ``tensor``: the tensor that comes out the other
    side and the bytes the frame took on the wire."""
    from ..errors import ProtocolError
    from ..wire import StreamData

    buffers = sender.send(StreamData(1, {}, (tensor,)))
    for buf in buffers:
        receiver.receive_data(buf)
    event = receiver.next_event()
    if not isinstance(event, StreamData):
        raise ProtocolError(f"expected the activation back, got {event!r}")
    return event.tensors[0], sum(memoryview(b).nbytes for b in buffers)


def measure(activation: torch.Tensor) -> list[CodecRow]:
    import torch
    import zstandard

    from ..errors import ProtocolError

    rows = [CodecRow("in memory, fp32", activation.numel() * 4, 0.0)]
    for name, compression in (("wire fp16, raw", False), ("wire fp16, zstd negotiated", True)):
        sender, receiver = connected_pair(compression)
        got, nbytes = send_through(sender, receiver, activation)
        if not torch.equal(got, activation):
            raise ProtocolError(f"{name}: the activation came back changed")
        seconds = best_of(lambda s=sender, r=receiver: send_through(s, r, activation))
        rows.append(CodecRow(name, nbytes, seconds))
    raw = activation.contiguous().numpy().tobytes()
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=False)
    dctx = zstandard.ZstdDecompressor()
    packed = cctx.compress(raw)
    rows.append(
        CodecRow(
            "zstd-1, no byte-shuffle",
            len(packed),
            best_of(lambda: dctx.decompress(cctx.compress(raw))),
        )
    )
    return rows


def render(rows: list[CodecRow], shape: tuple[int, ...], forward_s: float) -> str:
    base = next(r.nbytes for r in rows if r.name == "wire fp16, raw")
    lines = [
        f"activation: output of {LAYERS} Llama blocks (hidden {HIDDEN}) for a "
        f"{TOKENS}-token prompt, shape {list(shape)}; forward {forward_s * 1e3:.1f} ms",
        "",
        f"{'encoding':<28}{'bytes':>10}{'vs fp16':>9}{'enc+dec us':>12}",
    ]
    for r in rows:
        timing = f"{r.seconds * 1e6:>12.0f}" if r.seconds else f"{'-':>12}"
        lines.append(f"{r.name:<28}{r.nbytes:>10}{r.nbytes / base:>9.3f}{timing}")
    lines += [
        "",
        "wire rows include the frame header and metadata; the zstd-negotiated row",
        "is what the codec chose (byte-shuffled zstd when it saves >= 10%, else raw).",
    ]
    return "\n".join(lines)


def run() -> int:
    with tempfile.TemporaryDirectory(prefix="libpipe-demo-") as tmp:
        activation, forward_s = make_activation(Path(tmp))
    rows = measure(activation)
    print(render(rows, tuple(activation.shape), forward_s))
    return 0
