"""What the PLC is told for a part: the service's verdict when it came in time, else the fail-safe.

The fail-safe is the station's `on_timeout` result (NG by default: a part nobody judged is rejected) with Error
set, so the PLC can tell a judged part from one that was not. Error is also set for a part that failed (a
corrupt image, a refused request, no image at all), with the fail-safe result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from filo_line.client import Failure, Outcome, Verdict

VerdictLabel = Literal["ok", "ng", "timeout", "error"]
VERDICT_LABELS: tuple[VerdictLabel, ...] = ("ok", "ng", "timeout", "error")


@dataclass(frozen=True)
class Decision:
    verdict: VerdictLabel  # ok / ng: the service judged it; timeout: no verdict in time; error: it failed
    ok: bool  # ResultOK (else ResultNG)
    error: bool  # Error
    reason: str | None = None  # why there is no verdict

    @property
    def fail_safe(self) -> bool:
        return self.error


def fail_safe(on_timeout: Literal["ng", "ok"], verdict: VerdictLabel, reason: str) -> Decision:
    return Decision(verdict, on_timeout == "ok", True, reason)


def decide(outcome: Outcome, on_timeout: Literal["ng", "ok"]) -> Decision:
    """A verdict is signalled as it is (ResultNG when the service found the part anomalous); a failure gets the
    fail-safe: `timeout` when the service may answer later (the image goes to the spool), `error` when it
    refused the image (it never will)."""
    if isinstance(outcome, Verdict):
        return Decision("ng" if outcome.is_anomalous else "ok", not outcome.is_anomalous, False)
    assert isinstance(outcome, Failure)
    return fail_safe(on_timeout, "timeout" if outcome.transient else "error", outcome.describe())
