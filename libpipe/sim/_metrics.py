"""What a run measured, summarised the way the paper reports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError
from ._simulator import SessionOutcome


@dataclass(frozen=True)
class Summary:
    """Per-session figures averaged over all sessions of a run.

    ``mean_token_s`` is the headline: a session's time from arrival to its
    last token over its tokens (waiting, opening and prefill included, as a
    user experiences it); ``decode_token_s`` is the decode step alone.
    ``throughput_tokens_s`` counts tokens generated while sessions were
    still arriving (the first ``duration`` seconds): an overloaded placement
    falls behind the offered load there, however it catches up later.
    """

    sessions: int
    mean_token_s: float
    p95_token_s: float
    ttft_s: float
    p95_ttft_s: float
    wait_s: float
    p95_wait_s: float
    waited_fraction: float
    decode_token_s: float
    throughput_tokens_s: float
    mean_hops: float
    makespan_s: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(outcomes: Sequence[SessionOutcome], duration: float) -> Summary:
    if not outcomes:
        raise ConfigError(
            f"no session arrived in {duration:g} s: raise the duration or the arrival rate"
        )
    per_token = np.array([o.per_token for o in outcomes])
    ttft = np.array([o.ttft for o in outcomes])
    wait = np.array([o.wait for o in outcomes])
    return Summary(
        sessions=len(outcomes),
        mean_token_s=float(per_token.mean()),
        p95_token_s=float(np.percentile(per_token, 95)),
        ttft_s=float(ttft.mean()),
        p95_ttft_s=float(np.percentile(ttft, 95)),
        wait_s=float(wait.mean()),
        p95_wait_s=float(np.percentile(wait, 95)),
        waited_fraction=float((wait > 0).mean()),
        decode_token_s=float(np.mean([o.token_time for o in outcomes])),
        throughput_tokens_s=sum(o.tokens_by(duration) for o in outcomes) / duration,
        mean_hops=float(np.mean([o.hops for o in outcomes])),
        makespan_s=max(o.finished for o in outcomes),
    )
