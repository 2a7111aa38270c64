"""A suspicion timer that shortens as independent confirmations arrive.

From Lifeguard (Dadgar et al., "Lifeguard: Local Health Awareness for More
Accurate Failure Detection", 2018) as memberlist's suspicion.go does it: a
lone accuser may simply have a bad link, so its suspicion waits the long
``max_timeout``; every other member that independently suspects the same
incarnation is evidence, and after ``k`` of them the wait is down to
``min_timeout``. The decay is logarithmic so the first confirmations count
most:

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

This class is pure (no clock of its own): the node arms a trio cancel scope
at ``deadline`` and moves it whenever a confirmation arrives.
"""

from __future__ import annotations

import math


class Suspicion:
    def __init__(
        self, accuser: str, *, k: int, min_timeout: float, max_timeout: float, started: float
    ) -> None:
        self.k = k
        self.min_timeout = min_timeout
        # With no confirmations to wait for, the minimum is all there is.
        self.max_timeout = max_timeout if k >= 1 else min_timeout
        self.started = started
        self._confirmed: set[str] = {accuser}

    @property
    def confirmations(self) -> int:
        """Independent accusers beyond the first."""
        return len(self._confirmed) - 1

    def timeout(self) -> float:
        """Total time from ``started`` to the declaration of death."""
        c = self.confirmations
        if self.k < 1:
            return self.min_timeout
        frac = math.log(c + 1) / math.log(self.k + 1)
        return max(
            self.min_timeout, self.max_timeout - (self.max_timeout - self.min_timeout) * frac
        )

    @property
    def deadline(self) -> float:
        return self.started + self.timeout()

    def confirm(self, accuser: str) -> bool:
        """Record an accusation; True when it is new evidence (and worth relaying).

        Confirmations past ``k`` change nothing, so they are not news."""
        if accuser in self._confirmed or self.confirmations >= self.k:
            return False
        self._confirmed.add(accuser)
        return True
