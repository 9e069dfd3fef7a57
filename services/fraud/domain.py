"""Fraud decisions: pure, no I/O.

A transaction is scored from three things: the lists (block, allow, flagged
recipients), what the velocity store knew about its user and recipient just
before it (``History``; ``None`` when that store is unavailable), and the
trained model. Rules fire with a weight each; the rule score (their sum, at
most 100) and the model's probability combine into the score:

    score = 100 * (1 - (1 - rules/100) * (1 - p))

so either one alone can carry a transaction to review, and the two together
raise it further. Thresholds on the score decide (review at 65, block at 85);
hard rules come first (a blocklisted subject blocks, an allowlisted one skips
the rules) and a step-up amount sends large payments to review whatever
their score. Every figure is in ``Rules``, the one place to configure them.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from services.common.errors import InvalidArgument
from services.common.ids import parse_uuid
from services.common.money import (
    exponent,
    require_positive,
    to_major_units,
    to_minor_units,
    validate_currency,
)

RULES_ONLY = "rules-only"
# The most a transaction's time may lie ahead of the service's clock.
MAX_CLOCK_SKEW_SECONDS = 300.0
# The model is named among the reasons when it adds at least this much.
MODEL_REASON_MIN_POINTS = 5.0


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


class RecipientKind(enum.IntEnum):
    NONE = 0
    USER = 1
    MERCHANT = 2
    BANK = 3


class ReviewStatus(enum.IntEnum):
    OPEN = 1
    APPROVED = 2
    REJECTED = 3
    EXPIRED = 4


class ReviewDecision(enum.IntEnum):
    APPROVE = 1
    REJECT = 2


DegradedPolicy = Literal["threshold", "review", "allow"]


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
    model_version: str = RULES_ONLY
    # The engineered features the score was made from (stored for training).
    features: Mapping[str, float] = field(default_factory=dict, compare=False)
    # The velocity store was unavailable: its rules were not evaluated.
    degraded: bool = False
    review_id: str = ""


# ---------------------------------------------------------------- the rules' figures

VELOCITY_1M = "VELOCITY_1M"
VELOCITY_1H = "VELOCITY_1H"
UNUSUAL_AMOUNT = "UNUSUAL_AMOUNT"
NEW_DEVICE = "NEW_DEVICE"
NEW_COUNTRY = "NEW_COUNTRY"
IMPOSSIBLE_TRAVEL = "IMPOSSIBLE_TRAVEL"
FLAGGED_RECIPIENT = "FLAGGED_RECIPIENT"
# The rules that need the velocity store, reported as <CODE>_UNKNOWN without it.
HISTORY_RULES = (VELOCITY_1M, VELOCITY_1H, UNUSUAL_AMOUNT, NEW_DEVICE, NEW_COUNTRY,
                 IMPOSSIBLE_TRAVEL)  # fmt: skip

# Points each rule adds to the rule score. Alone, none but a flagged recipient
# reaches review (65); two strong signals together do (a burst on a new
# device, a new device in a new country with an unusual amount).
DEFAULT_WEIGHTS: Mapping[str, float] = {
    VELOCITY_1M: 40.0,
    VELOCITY_1H: 30.0,
    UNUSUAL_AMOUNT: 35.0,
    NEW_DEVICE: 15.0,
    NEW_COUNTRY: 20.0,
    IMPOSSIBLE_TRAVEL: 50.0,
    FLAGGED_RECIPIENT: 70.0,
}


@dataclass(frozen=True)
class Rules:
    """Every threshold and weight of the scorer. Amounts are in major units
    of the transaction's own currency."""

    review_score: float = 65.0
    block_score: float = 85.0
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    # Sliding windows: more than `limit` transactions in `seconds`.
    short_window_seconds: int = 60
    short_window_limit: int = 5
    long_window_seconds: int = 3600
    long_window_limit: int = 20
    # Unusual: more than `factor` times the median of the user's last
    # `typical_amounts_kept` amounts (in that currency), once there are at
    # least `typical_min_history`; before that, above `new_user_amount`.
    unusual_amount_factor: float = 10.0
    typical_amounts_kept: int = 20
    typical_min_history: int = 3
    new_user_amount: Decimal = Decimal("1000")
    impossible_speed_kmh: float = 900.0
    # Closer than this is location noise (IP geolocation, country centroids).
    travel_min_km: float = 100.0
    # Payments at or above this go to review (the payer's PIN) whatever their score.
    review_amount: Decimal | None = Decimal("10000")
    # Without the velocity store: "threshold" reviews at or above
    # `degraded_review_amount` (default: `review_amount`), "review" reviews
    # everything, "allow" decides on what is known.
    degraded_policy: DegradedPolicy = "threshold"
    degraded_review_amount: Decimal | None = None
    # How far back the recipient's distinct payers are counted.
    recipient_window_seconds: int = 86_400

    def __post_init__(self) -> None:
        if not 0 < self.review_score <= self.block_score <= 100:
            raise ValueError("need 0 < review_score <= block_score <= 100")
        unknown = set(self.weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown rules in weights: {sorted(unknown)}")

    def weight(self, code: str) -> float:
        return float(self.weights.get(code, DEFAULT_WEIGHTS[code]))

    def decide(self, score: float) -> Decision:
        if score >= self.block_score:
            return Decision.BLOCK
        if score >= self.review_score:
            return Decision.REVIEW
        return Decision.ALLOW


DEFAULT_RULES = Rules()


@functools.lru_cache(maxsize=256)
def minor(amount: Decimal, currency: str) -> int:
    """A threshold in major units as minor units of the currency."""
    return to_minor_units(amount, currency)


# ---------------------------------------------------------------- the transaction


@dataclass(frozen=True)
class ScoreCommand:
    transaction_id: str
    user_id: str
    type: str
    amount: int
    currency: str
    recipient_kind: int = 0
    recipient_id: str = ""
    device_id: str = ""
    ip: str = ""
    country: str = ""
    has_location: bool = False
    latitude: float = 0.0
    longitude: float = 0.0
    # Seconds since the epoch; None: now.
    timestamp: float | None = None


@dataclass(frozen=True)
class Transaction:
    """A transaction as scored: validated and normalised."""

    transaction_id: uuid.UUID
    user_id: uuid.UUID
    type: str
    amount: int
    currency: str
    at: float
    recipient_kind: RecipientKind = RecipientKind.NONE
    recipient_id: str = ""
    device_id: str = ""
    ip: str = ""
    country: str = ""
    location: tuple[float, float] | None = None


_TYPE_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,39}$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")


def read_transaction(cmd: ScoreCommand, now: float) -> Transaction:
    """The command as a transaction, or INVALID_ARGUMENT with a reason."""
    transaction_id = parse_uuid(cmd.transaction_id, "transaction_id")
    user_id = parse_uuid(cmd.user_id, "user_id")
    if not _TYPE_RE.match(cmd.type):
        raise InvalidArgument(
            "type must be 1 to 40 upper-case letters, digits or _ (P2P_OUT, ...)",
            reason="INVALID_TYPE",
        )
    require_positive(cmd.amount)
    validate_currency(cmd.currency)
    try:
        kind = RecipientKind(cmd.recipient_kind)
    except ValueError:
        raise InvalidArgument("unknown recipient_kind", reason="INVALID_RECIPIENT_KIND") from None
    recipient = cmd.recipient_id
    if recipient and kind is not RecipientKind.BANK:
        recipient = str(parse_uuid(recipient, "recipient_id"))
    elif len(recipient) > 200:
        raise InvalidArgument("recipient_id is too long", reason="INVALID_ID",
                              details={"field": "recipient_id"})  # fmt: skip
    if len(cmd.device_id) > 200:
        raise InvalidArgument("device_id is at most 200 characters", reason="INVALID_DEVICE_ID")
    ip = cmd.ip
    if ip:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise InvalidArgument("ip is not an IP address", reason="INVALID_IP") from None
    if cmd.country and not _COUNTRY_RE.match(cmd.country):
        raise InvalidArgument("country must be ISO 3166-1 alpha-2", reason="INVALID_COUNTRY")
    lat, lon = cmd.latitude, cmd.longitude
    if not (math.isfinite(lat) and math.isfinite(lon)) or (
        cmd.has_location and not (-90 <= lat <= 90 and -180 <= lon <= 180)
    ):
        raise InvalidArgument("coordinates are out of range", reason="INVALID_COORDINATES")
    at = now if cmd.timestamp is None else cmd.timestamp
    if not math.isfinite(at) or at > now + MAX_CLOCK_SKEW_SECONDS or at < 0:
        raise InvalidArgument(
            "timestamp is in the future or out of range", reason="INVALID_TIMESTAMP"
        )
    return Transaction(
        transaction_id=transaction_id, user_id=user_id, type=cmd.type, amount=cmd.amount,
        currency=cmd.currency, at=at, recipient_kind=kind, recipient_id=recipient,
        device_id=cmd.device_id, ip=ip, country=cmd.country,
        location=(lat, lon) if cmd.has_location else None,
    )  # fmt: skip


# ---------------------------------------------------------------- what was known before


@dataclass(frozen=True)
class History:
    """What the velocity store knew just before a transaction."""

    # Transactions of the user in the short and the long window, this one included.
    velocity: tuple[int, int] = (1, 1)
    # The user's latest amounts in this currency before this one, newest first.
    recent_amounts: tuple[int, ...] = ()
    # None: the transaction named no device (or country, or recipient).
    device_known: bool | None = None
    devices_known: int = 0
    country_known: bool | None = None
    countries_known: int = 0
    # Latitude, longitude and time of the user's last located transaction.
    last_location: tuple[float, float, float] | None = None
    payee_known: bool | None = None
    # When anyone first paid the recipient; None: this is the first time.
    recipient_since: float | None = None
    # Distinct payers of the recipient in the recipient window, this one included.
    recipient_payers: int = 1


@dataclass(frozen=True)
class ListHits:
    """The transaction's subjects found on the lists."""

    blocked: tuple[Subject, ...] = ()
    allowed: tuple[Subject, ...] = ()
    recipient_flagged: bool = False


def subjects(tx: Transaction) -> dict[Subject, str]:
    return {
        Subject.USER: str(tx.user_id),
        Subject.DEVICE: tx.device_id,
        Subject.IP: tx.ip,
        Subject.COUNTRY: tx.country,
    }


def typical_amount(amounts: Sequence[int]) -> float:
    """The median: robust to the odd large payment, which an average is not."""
    ordered = sorted(amounts)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance on a sphere of the Earth's mean radius."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def travel(tx: Transaction, history: History) -> tuple[float, float, float] | None:
    """Distance (km), time (s) and speed (km/h) from the last located
    transaction; None when either has no location."""
    if tx.location is None or history.last_location is None:
        return None
    lat, lon, at = history.last_location
    km = haversine_km(lat, lon, *tx.location)
    seconds = max(tx.at - at, 0.0)
    # Two payments in the same minute are a minute apart at least: clocks
    # and the order of arrival are not exact.
    return km, seconds, km / (max(seconds, 60.0) / 3600)


def _window(seconds: int) -> str:
    return f"{seconds // 3600} h" if seconds % 3600 == 0 else f"{seconds} s"


def history_reasons(tx: Transaction, history: History, rules: Rules) -> list[Reason]:
    """The rules that need the velocity store, as they fired."""
    reasons = []
    for code, count, limit, seconds in (
        (VELOCITY_1M, history.velocity[0], rules.short_window_limit, rules.short_window_seconds),
        (VELOCITY_1H, history.velocity[1], rules.long_window_limit, rules.long_window_seconds),
    ):
        if count > limit:
            reasons.append(Reason(code, f"{count} transactions in {_window(seconds)}",
                                  rules.weight(code)))  # fmt: skip
    amount = to_major_units(tx.amount, tx.currency)
    if len(history.recent_amounts) >= rules.typical_min_history:
        typical = typical_amount(history.recent_amounts)
        if tx.amount > rules.unusual_amount_factor * typical:
            reasons.append(Reason(
                UNUSUAL_AMOUNT,
                f"{amount} {tx.currency} is {tx.amount / typical:.1f}x the typical "
                f"{to_major_units(round(typical), tx.currency)} (median of the last "
                f"{len(history.recent_amounts)})",
                rules.weight(UNUSUAL_AMOUNT),
            ))  # fmt: skip
    elif tx.amount > minor(rules.new_user_amount, tx.currency):
        reasons.append(Reason(
            UNUSUAL_AMOUNT,
            f"{amount} {tx.currency} with {len(history.recent_amounts)} earlier payments "
            f"in {tx.currency}: above {rules.new_user_amount} for a user without history",
            rules.weight(UNUSUAL_AMOUNT),
        ))  # fmt: skip
    # Novelty means something only once the user has a past to differ from.
    if history.device_known is False and history.devices_known > 0:
        reasons.append(Reason(NEW_DEVICE, f"a device never seen for this user "
                              f"({history.devices_known} known)", rules.weight(NEW_DEVICE)))  # fmt: skip
    if history.country_known is False and history.countries_known > 0:
        reasons.append(Reason(NEW_COUNTRY, f"{tx.country}, a country never seen for this "
                              f"user ({history.countries_known} known)",
                              rules.weight(NEW_COUNTRY)))  # fmt: skip
    moved = travel(tx, history)
    if moved is not None:
        km, elapsed, speed = moved
        if km >= rules.travel_min_km and speed > rules.impossible_speed_kmh:
            reasons.append(Reason(IMPOSSIBLE_TRAVEL, f"{km:,.0f} km in {elapsed / 60:,.1f} min: "
                                  f"{speed:,.0f} km/h", rules.weight(IMPOSSIBLE_TRAVEL)))  # fmt: skip
    return reasons


# ---------------------------------------------------------------- features

FEATURES: tuple[str, ...] = (
    "log_amount",  # log10(1 + amount in major units)
    "amount_vs_typical",  # log10(amount / median of recent amounts); 0 without history
    "no_history",  # fewer earlier amounts than typical_min_history
    "velocity_short",  # log(1 + earlier transactions in the short window)
    "velocity_long",  # log(1 + earlier transactions in the long window)
    "new_device",
    "new_country",
    "travel_speed",  # log10(1 + km/h since the last located transaction)
    "new_payee",  # the user never paid this recipient before
    "recipient_new",  # nobody paid the recipient before the last day
    "recipient_payers",  # log(1 + other distinct payers of the recipient in the window)
    "recipient_flagged",
    "hour_sin",  # time of day (UTC) on the unit circle
    "hour_cos",
)


def features(
    tx: Transaction, history: History | None, flagged: bool, rules: Rules = DEFAULT_RULES
) -> dict[str, float]:
    """The model's inputs. Without a history (the velocity store down) its
    features are 0: what a transaction with nothing unusual about it has."""
    hour = (tx.at % 86_400) / 3600
    values = {
        "log_amount": math.log10(1 + tx.amount / 10 ** exponent(tx.currency)),
        "recipient_flagged": 1.0 if flagged else 0.0,
        "hour_sin": math.sin(2 * math.pi * hour / 24),
        "hour_cos": math.cos(2 * math.pi * hour / 24),
    }
    if history is None:
        return {name: values.get(name, 0.0) for name in FEATURES}
    enough = len(history.recent_amounts) >= rules.typical_min_history
    ratio = tx.amount / typical_amount(history.recent_amounts) if enough else 1.0
    moved = travel(tx, history)
    since = history.recipient_since
    values.update(
        amount_vs_typical=max(-4.0, min(4.0, math.log10(ratio))),
        no_history=0.0 if enough else 1.0,
        velocity_short=math.log1p(max(0, history.velocity[0] - 1)),
        velocity_long=math.log1p(max(0, history.velocity[1] - 1)),
        new_device=1.0 if history.device_known is False and history.devices_known else 0.0,
        new_country=1.0 if history.country_known is False and history.countries_known else 0.0,
        travel_speed=math.log10(1 + moved[2]) if moved and moved[0] >= rules.travel_min_km
        else 0.0,
        new_payee=1.0 if history.payee_known is False else 0.0,
        recipient_new=1.0 if tx.recipient_kind is RecipientKind.USER and tx.recipient_id
        and (since is None or tx.at - since < 86_400) else 0.0,
        recipient_payers=math.log1p(max(0, history.recipient_payers - 1)),
    )  # fmt: skip
    return {name: values[name] for name in FEATURES}


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Model:
    """Logistic regression over standardised features: inference is one dot
    product and a sigmoid."""

    version: str
    feature_names: tuple[str, ...]
    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    bias: float
    # Standardisation folded into the weights, worked out once.
    _w: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    _b: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.feature_names)
        if not (self.mean.shape == self.scale.shape == self.weights.shape == (n,)):
            raise ValueError("a model's arrays must have one value per feature")
        if not np.all(self.scale > 0) or not all(
            np.all(np.isfinite(a)) for a in (self.mean, self.weights)
        ):
            raise ValueError("a model's parameters must be finite, its scales positive")
        object.__setattr__(self, "_w", self.weights / self.scale)
        object.__setattr__(
            self, "_b", float(self.bias - np.dot(self.weights, self.mean / self.scale))
        )

    def probability(self, values: Mapping[str, float]) -> float:
        x = np.fromiter((values.get(n, 0.0) for n in self.feature_names), np.float64,
                        len(self.feature_names))  # fmt: skip
        return sigmoid(float(np.dot(self._w, x)) + self._b)

    def probabilities(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """For rows of features in ``feature_names`` order."""
        z = matrix @ self._w + self._b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def parameters(self) -> dict[str, Any]:
        return {
            "features": list(self.feature_names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
        }

    @classmethod
    def from_parameters(cls, version: str, parameters: Mapping[str, Any]) -> Model:
        return cls(
            version=version,
            feature_names=tuple(parameters["features"]),
            mean=np.asarray(parameters["mean"], dtype=np.float64),
            scale=np.asarray(parameters["scale"], dtype=np.float64),
            weights=np.asarray(parameters["weights"], dtype=np.float64),
            bias=float(parameters["bias"]),
        )


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# ---------------------------------------------------------------- the verdict


def combine(rule_points: float, probability: float) -> float:
    """The score from the rules' points and the model's probability."""
    rules = min(100.0, max(0.0, rule_points)) / 100
    return round(100 * (1 - (1 - rules) * (1 - probability)), 2)


def assess(
    tx: Transaction,
    history: History | None,
    lists: ListHits,
    rules: Rules = DEFAULT_RULES,
    model: Model | None = None,
) -> Verdict:
    """The verdict on a transaction; ``history`` is None when the velocity
    store could not be reached."""
    version = model.version if model is not None else RULES_ONLY
    values = features(tx, history, lists.recipient_flagged, rules)
    degraded = history is None
    if lists.blocked:
        return Verdict(100.0, Decision.BLOCK, [
            Reason(f"BLOCKLISTED_{s.name}", f"{s.name.lower()} is on the block list", 100.0)
            for s in lists.blocked
        ], version, values, degraded)  # fmt: skip
    if lists.allowed:
        return Verdict(0.0, Decision.ALLOW, [
            Reason(f"ALLOWLISTED_{s.name}", f"{s.name.lower()} is on the allow list", 0.0)
            for s in lists.allowed
        ], version, values, degraded)  # fmt: skip

    if history is None:
        reasons = [Reason(f"{code}_UNKNOWN", "not evaluated: the velocity store is unavailable",
                          0.0) for code in HISTORY_RULES]  # fmt: skip
    else:
        reasons = history_reasons(tx, history, rules)
    if lists.recipient_flagged:
        reasons.append(Reason(FLAGGED_RECIPIENT, "the recipient is flagged as suspect",
                              rules.weight(FLAGGED_RECIPIENT)))  # fmt: skip
    rule_points = sum(r.weight for r in reasons)
    probability = model.probability(values) if model is not None else 0.0
    score = combine(rule_points, probability)
    if probability * 100 >= MODEL_REASON_MIN_POINTS:
        reasons.append(Reason("MODEL", f"fraud probability {probability:.2f} ({version})",
                              round(score - combine(rule_points, 0.0), 2)))  # fmt: skip
    decision = rules.decide(score)

    if rules.review_amount is not None and tx.amount >= minor(rules.review_amount, tx.currency):
        reasons.append(Reason("LARGE_AMOUNT", f"{to_major_units(tx.amount, tx.currency)} "
                              f"{tx.currency} is at or above the step-up amount "
                              f"{rules.review_amount}", 0.0))  # fmt: skip
        decision = max(decision, Decision.REVIEW)
    if degraded and decision < Decision.REVIEW:
        floor = rules.degraded_review_amount or rules.review_amount
        if rules.degraded_policy == "review" or (
            rules.degraded_policy == "threshold"
            and floor is not None
            and tx.amount >= minor(floor, tx.currency)
        ):
            reasons.append(Reason("DEGRADED_REVIEW", f"without the velocity store, policy "
                                  f"{rules.degraded_policy!r} reviews this payment", 0.0))  # fmt: skip
            decision = Decision.REVIEW
    return Verdict(score, decision, reasons, version, values, degraded)
