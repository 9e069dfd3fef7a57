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
) -> Verdict:
    """A blocklisted user, device, IP or country blocks outright; an
    allowlisted one is recorded as such."""
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
    return Verdict(
        score=0.0,
        decision=Decision.ALLOW,
        reasons=[
            Reason(f"ALLOWLISTED_{s.name}", f"{s.name.lower()} is on the allow list", 0.0)
            for s, _ in allow_hits
        ],
    )
