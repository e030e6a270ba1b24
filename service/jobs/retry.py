"""How the folder jobs wait before trying again: exponential backoff with a cap.

One policy for every retry of a job (a full service queue, a timeout, a file still being copied,
too many open files), so ``--backoff``-style settings mean the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.5  # the first pause
    factor: float = 2.0  # each further pause is this much longer ...
    cap_s: float = 30.0  # ... up to this

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The pause before retry number ``attempt`` (0-based).

        A server's ``Retry-After`` replaces the computed pause, but never beyond the cap: a
        misconfigured or hostile server must not park the job for an hour.
        """
        pause = retry_after if retry_after is not None else self.first_s * self.factor ** attempt
        return max(0.0, min(pause, self.cap_s))
