"""What a block server is told: one frozen dataclass, built from flags or by tests.

Every field documents where its default comes from. Checks that need no
file or device run here, so a wrong flag fails before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..swarm import GossipConfig
from ._executor import DEFAULT_INLINE_MAX

# A volunteer GPU rarely spares more than a few GiB for caches after the
# weights; 1 GiB holds ~2000 tokens of a 70B model's 10 blocks (GQA, fp16).
DEFAULT_CACHE_BYTES = 1 << 30
# The long-context target on GQA models.
DEFAULT_MAX_LENGTH = 8192
# PETALS' default for an inference session that hears nothing.
DEFAULT_IDLE_TIMEOUT = 60.0
# systemd waits 90 s between SIGTERM and SIGKILL; half of it leaves room to exit.
DEFAULT_DRAIN_GRACE = 30.0
# Inputs of forward/backward calls held at once (queued or computing): two
# calls at the frame limit (512 MiB each), a few hundred of common size.
DEFAULT_BULK_BYTES = 1 << 30
# Rows in one batched decode pass; beyond ~64 a CPU or small GPU is
# compute-bound and a bigger batch only adds latency to every member.
DEFAULT_MAX_BATCH = 64
# PETALS re-checks its blocks every few minutes; a minute is well above the
# seconds a move takes (loading blocks), which the jittered period must exceed.
DEFAULT_REBALANCE_PERIOD = 60.0
# How often a changed load (free cache, sessions) is re-announced: each
# re-signing is news for the whole swarm, so not on every session.
DEFAULT_RECORD_INTERVAL = 1.0
CACHE_DIR_ENV = "LIBPIPE_CACHE_DIR"


def parse_blocks(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``, half-open, ``0 <= A < B``."""
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise ConfigError(f"--blocks must be A:B (e.g. 0:8), got {text!r}")
    a, b = int(start), int(end)
    if not a < b:
        raise ConfigError(f"--blocks {text}: the start must be below the end")
    return a, b


def default_cache_dir() -> Path:
    """``$LIBPIPE_CACHE_DIR``, else ``~/.cache/libpipe``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "libpipe"


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    # None: choose the span from the swarm and move it when the swarm gains
    # (server/_rebalance.py); its length from num_blocks, else memory_bytes.
    blocks: tuple[int, int] | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; the server reports the one it bound
    device: str = "cpu"
    dtype: str | None = None  # None: the device's default (fp32 on CPU, fp16 on GPUs)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_length: int = DEFAULT_MAX_LENGTH  # capped by the model's max_position_embeddings
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    drain_grace: float = DEFAULT_DRAIN_GRACE
    batching: bool = True  # batch decode steps of concurrent sessions (off: one at a time)
    max_batch: int = DEFAULT_MAX_BATCH
    # Seconds: a lone session's decode step runs on the event loop thread
    # (no hand-off to the compute thread) when its last pass took at most
    # this; the loop answers anything else at most this late. 0: never.
    inline_decode_max: float = DEFAULT_INLINE_MAX
    # Positions per prefill chunk (attention scratch ~ chunk x context).
    prefill_chunk: int = 512
    # Blocks per job of a backward call (server/_compute.ChunkedBackward):
    # one block lets decode steps in between the most often and keeps the
    # fewest activations; more blocks recompute less (one forward of all
    # chunks but the last is the price of chunking).
    backward_chunk: int = 1
    # Blocks per job of a forward call (server/_compute.ChunkedForward):
    # decode steps run between jobs; a job costs a hand-off to the compute
    # thread (~0.5 ms on a small CPU host) but no recomputation.
    forward_chunk: int = 1
    # Bytes of forward/backward inputs held at once; past it calls are busy.
    bulk_bytes: int = DEFAULT_BULK_BYTES
    # (decode steps/s, forward tokens/s) to announce instead of measuring.
    throughput: tuple[float, float] | None = None
    # Seconds spent timing each of decode and forward when measuring: a
    # couple of seconds averages out a GPU's clock ramp-up and OS noise.
    measure_seconds: float = 2.0
    cache_dir: Path = field(default_factory=default_cache_dir)
    peers: tuple[str, ...] = ()
    announce_address: str | None = None
    gossip: GossipConfig = field(default_factory=GossipConfig.lan)
    record_interval: float = DEFAULT_RECORD_INTERVAL
    progress: bool = True  # progress bars while loading and measuring
    num_blocks: int | None = None  # without blocks: hold this many (default: what memory fits)
    memory_bytes: int | None = None  # without blocks: budget (default: a share of free memory)
    rebalance_period: float = DEFAULT_REBALANCE_PERIOD
    # LoRA adapter directories (PEFT layout), each named after its directory.
    adapters: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "adapters", tuple(Path(a) for a in self.adapters))
        if self.blocks is not None and not 0 <= self.blocks[0] < self.blocks[1]:
            raise ConfigError(f"blocks must satisfy 0 <= start < end, got {self.blocks}")
        if self.blocks is not None and (self.num_blocks, self.memory_bytes) != (None, None):
            raise ConfigError("--num-blocks and --memory size a chosen span: not with --blocks")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be at least 1, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ConfigError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        for name in ("cache_bytes",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in (
            "max_length",
            "max_batch",
            "prefill_chunk",
            "backward_chunk",
            "forward_chunk",
            "bulk_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.inline_decode_max < float("inf"):
            raise ConfigError(
                f"inline_decode_max must be a finite number of seconds >= 0, got {self.inline_decode_max}"
            )
        for name in ("idle_timeout", "drain_grace", "record_interval", "rebalance_period"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.throughput is not None and not all(v > 0 for v in self.throughput):
            raise ConfigError(f"throughput values must be positive, got {self.throughput}")
        if self.announce_address is None and self.host in ("0.0.0.0", "::", ""):
            raise ConfigError(
                f"listening on {self.host or 'all interfaces'}: give --announce-address "
                "HOST:PORT so that peers know where to reach this server"
            )
