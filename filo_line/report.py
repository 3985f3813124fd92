"""The one message each part leaves behind: what was inspected, what the PLC was told and when.

Publishers send it as it is (MQTT: one JSON object per part, docs/line.md lists the fields); a late verdict from
the spool is a second report for the same part with `late: true`, its own verdict, and the PLC signal the part
got at the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from filo_line.client import Outcome, Verdict
from filo_line.decision import Decision, VerdictLabel


def iso_utc(t: float | None) -> str | None:
    """ISO-8601 in UTC with milliseconds and a Z, as the service's records write times."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Signalled:
    """The PLC signal a part got (None on the report where there is no PLC or it was missed)."""

    ok: bool
    ng: bool
    error: bool

    @classmethod
    def of(cls, decision: Decision) -> Signalled:
        return cls(decision.ok, not decision.ok, decision.error)


@dataclass(frozen=True)
class PartReport:
    station: str
    part_id: str
    request_id: str
    verdict: VerdictLabel
    triggered_at: float
    latency_ms: float  # live: trigger to signal; late: trigger to the late verdict
    signalled_at: float | None  # when the result was written to the PLC (or decided, without a PLC)
    signalled: Signalled | None
    late: bool
    image_name: str
    score: float | None = None
    threshold: float | None = None
    needs_review: bool | None = None
    top_type: str | None = None
    boxes: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None

    @classmethod
    def build(cls, *, station: str, part_id: str, request_id: str, outcome: Outcome | None, verdict: VerdictLabel,
              reason: str | None, triggered_at: float, done_at: float, signalled_at: float | None,
              signalled: Signalled | None, late: bool, image_name: str) -> PartReport:
        judged = outcome if isinstance(outcome, Verdict) else None
        return cls(
            station=station, part_id=part_id, request_id=request_id, verdict=verdict, triggered_at=triggered_at,
            latency_ms=round((done_at - triggered_at) * 1000, 1), signalled_at=signalled_at, signalled=signalled,
            late=late, image_name=image_name,
            score=judged.score if judged else None, threshold=judged.threshold if judged else None,
            needs_review=judged.needs_review if judged else None, top_type=judged.top_type if judged else None,
            boxes=list(judged.boxes) if judged else [], reason=reason,
        )

    def message(self) -> dict[str, Any]:
        """The JSON object published for the part."""
        return {
            "station": self.station,
            "part_id": self.part_id,
            "request_id": self.request_id,
            "verdict": self.verdict,
            "score": self.score,
            "threshold": self.threshold,
            "needs_review": self.needs_review,
            "top_type": self.top_type,
            "boxes": self.boxes,
            "latency_ms": self.latency_ms,
            "triggered_at": iso_utc(self.triggered_at),
            "signalled_at": iso_utc(self.signalled_at),
            "signalled": None if self.signalled is None else {
                "ok": self.signalled.ok, "ng": self.signalled.ng, "error": self.signalled.error},
            "late": self.late,
            "reason": self.reason,
            "image": self.image_name,
        }
