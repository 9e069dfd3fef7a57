"""Fraud decisions: pure, no I/O.

This is the walking skeleton's scorer: hard rules from the block and allow
lists only. Velocity, anomaly rules and the trained model come with the fraud
service proper; the contract (score, decision, reasons, model version) is
already the final one.
"""

from __future__ import annotations

import enum
from collections.abc import Set
from dataclasses import dataclass, field

MODEL_VERSION = "lists-v0"


class Decision(enum.IntEnum):
    ALLOW = 1
    REVIEW = 2
    BLOCK = 3


class Subject(enum.IntEnum):
    USER = 1
    DEVICE = 2
    IP = 3
    COUNTRY = 4


class ListKind(enum.IntEnum):
    BLOCK = 1
    ALLOW = 2


@dataclass(frozen=True)
class Reason:
    code: str
    detail: str
    weight: float


@dataclass(frozen=True)
class Verdict:
    score: float
    decision: Decision
    reasons: list[Reason] = field(default_factory=list)
    model_version: str = MODEL_VERSION


def decide(
    subjects: dict[Subject, str],
    blocked: Set[tuple[Subject, str]],
    allowed: Set[tuple[Subject, str]],
    amount: int = 0,
    review_threshold: int | None = None,
) -> Verdict:
    """A blocklisted user, device, IP or country blocks outright; an
    allowlisted one skips the rules and is recorded as such; an amount at or
    above the review threshold goes to review (PIN step-up)."""
    hits = [(s, v) for s, v in subjects.items() if v and (s, v) in blocked]
    if hits:
        return Verdict(
            score=100.0,
            decision=Decision.BLOCK,
            reasons=[
                Reason(f"BLOCKLISTED_{s.name}", f"{s.name.lower()} is on the block list", 100.0)
                for s, _ in hits
            ],
        )
    allow_hits = [(s, v) for s, v in subjects.items() if v and (s, v) in allowed]
    if not allow_hits and review_threshold is not None and amount >= review_threshold:
        return Verdict(
            score=70.0,
            decision=Decision.REVIEW,
            reasons=[
                Reason("LARGE_AMOUNT", "the amount is at or above the review threshold", 70.0)
            ],
        )
    return Verdict(
        score=0.0,
        decision=Decision.ALLOW,
        reasons=[
            Reason(f"ALLOWLISTED_{s.name}", f"{s.name.lower()} is on the allow list", 0.0)
            for s, _ in allow_hits
        ],
    )
