"""The fraud rules as pure logic: how rules, model and thresholds make a
verdict, the step-up amount, the degraded policy, and the figures the
reasons carry."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.fraud.domain import (
    DEFAULT_RULES,
    FEATURES,
    RULES_ONLY,
    Decision,
    History,
    ListHits,
    Model,
    Rules,
    ScoreCommand,
    Subject,
    Transaction,
    assess,
    combine,
    features,
    haversine_km,
    read_transaction,
    typical_amount,
)

NOW = 1_767_225_600.0


def tx(**overrides: Any) -> Transaction:
    base = Transaction(uuid.uuid4(), uuid.uuid4(), "P2P_OUT", 2_500, "USD", NOW)
    return replace(base, **overrides)


def known_user(**overrides: Any) -> History:
    """A user with a past: amounts around 25.00, one device, one country."""
    base = History(recent_amounts=(2_500, 2_000, 3_000), device_known=True, devices_known=1,
                   country_known=True, countries_known=1)  # fmt: skip
    return replace(base, **overrides)


def codes(history: History | None, **t: Any) -> list[str]:
    return [r.code for r in assess(tx(**t), history, ListHits()).reasons]


def constant_model(probability: float) -> Model:
    n = len(FEATURES)
    bias = math.log(probability / (1 - probability))
    return Model("test-model", FEATURES, np.zeros(n), np.ones(n), np.zeros(n), bias)


# ---------------------------------------------------------------- the score


def test_rules_alone_make_the_score() -> None:
    assert combine(40, 0.0) == 40.0


def test_model_alone_makes_the_score() -> None:
    assert combine(0, 0.7) == 70.0


def test_rules_and_model_together_score_higher_than_either() -> None:
    assert combine(40, 0.5) == 70.0


def test_rule_points_beyond_100_count_as_100() -> None:
    assert combine(170, 0.2) == 100.0


@pytest.mark.parametrize(
    ("score", "decision"),
    [(64.99, Decision.ALLOW), (65, Decision.REVIEW), (84.99, Decision.REVIEW),
     (85, Decision.BLOCK)],
)  # fmt: skip
def test_thresholds_decide_review_at_65_and_block_at_85(score: float, decision: Decision) -> None:
    assert DEFAULT_RULES.decide(score) == decision


def test_thresholds_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="review_score"):
        Rules(review_score=90, block_score=80)


def test_an_unknown_rule_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown rules"):
        Rules(weights={"VELOCITY_1D": 10})


# ---------------------------------------------------------------- verdicts


def test_a_burst_on_a_new_device_goes_to_review() -> None:
    verdict = assess(tx(device_id="new"), known_user(velocity=(6, 6), device_known=False),
                     ListHits())  # fmt: skip

    assert (verdict.score, verdict.decision) == (55.0, Decision.ALLOW)
    abroad = assess(tx(device_id="new", country="NG"),
                    known_user(velocity=(6, 6), device_known=False, country_known=False),
                    ListHits())  # fmt: skip
    assert (abroad.score, abroad.decision) == (75.0, Decision.REVIEW)


def test_a_model_confident_of_fraud_blocks_by_itself() -> None:
    verdict = assess(tx(), known_user(), ListHits(), model=constant_model(0.9))

    assert (verdict.decision, verdict.model_version) == (Decision.BLOCK, "test-model")
    assert verdict.reasons[0].code == "MODEL"
    assert verdict.reasons[0].detail == "fraud probability 0.90 (test-model)"


def test_a_model_that_sees_nothing_adds_no_reason() -> None:
    verdict = assess(tx(), known_user(), ListHits(), model=constant_model(0.01))

    assert (verdict.score, verdict.reasons) == (1.0, [])


def test_without_a_model_the_version_says_rules_only() -> None:
    assert assess(tx(), known_user(), ListHits()).model_version == RULES_ONLY


def test_blocklisting_wins_over_everything() -> None:
    lists = ListHits(blocked=(Subject.IP,), allowed=(Subject.USER,))

    verdict = assess(tx(), known_user(), lists, model=constant_model(0.01))

    assert (verdict.decision, verdict.score, [r.code for r in verdict.reasons]) == (
        Decision.BLOCK, 100.0, ["BLOCKLISTED_IP"],
    )  # fmt: skip


def test_an_allowlisted_user_skips_the_rules_even_at_the_step_up_amount() -> None:
    verdict = assess(tx(amount=5_000_000), known_user(velocity=(9, 30)),
                     ListHits(allowed=(Subject.USER,)))  # fmt: skip

    assert (verdict.decision, [r.code for r in verdict.reasons]) == (
        Decision.ALLOW, ["ALLOWLISTED_USER"],
    )  # fmt: skip


def test_the_step_up_amount_reviews_whatever_the_score() -> None:
    verdict = assess(tx(amount=1_000_000), known_user(recent_amounts=(900_000,) * 3), ListHits())

    assert (verdict.score, verdict.decision) == (0.0, Decision.REVIEW)
    assert verdict.reasons[-1].detail == ("10000.00 USD is at or above the step-up amount 10000")


def test_the_step_up_amount_is_in_major_units_of_the_currency() -> None:
    yen = assess(tx(amount=10_000, currency="JPY"), known_user(recent_amounts=(9_000,) * 3),
                 ListHits())  # fmt: skip

    assert yen.decision == Decision.REVIEW


def test_a_flagged_recipient_alone_goes_to_review() -> None:
    verdict = assess(tx(recipient_id=str(uuid.uuid4())), known_user(),
                     ListHits(recipient_flagged=True))  # fmt: skip

    assert (verdict.score, verdict.decision) == (70.0, Decision.REVIEW)


# ---------------------------------------------------------------- each rule's figures


def test_velocity_fires_above_the_limit_only() -> None:
    assert codes(known_user(velocity=(5, 5))) == []
    assert codes(known_user(velocity=(6, 6))) == ["VELOCITY_1M"]
    assert codes(known_user(velocity=(1, 21))) == ["VELOCITY_1H"]


def test_the_typical_amount_is_the_median() -> None:
    assert typical_amount([100, 300, 200, 10_000]) == 250.0
    assert typical_amount([7]) == 7.0


def test_an_amount_just_above_ten_times_typical_is_unusual() -> None:
    history = known_user(recent_amounts=(2_500,) * 3)

    assert codes(history, amount=25_000) == []
    assert codes(history, amount=25_001) == ["UNUSUAL_AMOUNT"]


def test_a_user_with_little_history_is_judged_against_the_new_user_amount() -> None:
    history = known_user(recent_amounts=(100, 100))

    assert codes(history, amount=100_000) == []
    assert codes(history, amount=100_001) == ["UNUSUAL_AMOUNT"]


def test_novelty_needs_a_past_to_differ_from() -> None:
    first = History(device_known=False, devices_known=0, country_known=False, countries_known=0)

    assert codes(first, device_id="d", country="DE") == []


def test_impossible_travel_needs_distance_and_speed() -> None:
    berlin = (52.52, 13.405)
    last = known_user(last_location=(*berlin, NOW - 600))

    assert codes(last, location=(52.6, 13.5)) == []  # 11 km in 10 min: jitter
    assert codes(last, location=(48.8566, 2.3522)) == ["IMPOSSIBLE_TRAVEL"]  # Paris, 10 min
    assert codes(replace(last, last_location=(*berlin, NOW - 3 * 3600)),
                 location=(48.8566, 2.3522)) == []  # fmt: skip


def test_haversine_matches_a_known_distance() -> None:
    # Paris to London, about 344 km.
    assert haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=1)


# ---------------------------------------------------------------- degraded


def test_degraded_rules_are_reported_unknown_and_small_payments_allowed() -> None:
    verdict = assess(tx(amount=5_000), None, ListHits())

    assert verdict.degraded and verdict.decision == Decision.ALLOW
    assert all(r.code.endswith("_UNKNOWN") and r.weight == 0 for r in verdict.reasons)


@pytest.mark.parametrize(
    ("policy", "amount", "decision"),
    [("threshold", 9_999, Decision.ALLOW), ("threshold", 10_000, Decision.REVIEW),
     ("review", 1, Decision.REVIEW), ("allow", 10_000_000_000, Decision.ALLOW)],
)  # fmt: skip
def test_the_degraded_policy_decides_without_the_velocity_store(
    policy: Any, amount: int, decision: Decision
) -> None:
    rules = Rules(degraded_policy=policy, degraded_review_amount=Decimal("100"),
                  review_amount=None)  # fmt: skip

    assert assess(tx(amount=amount), None, ListHits(), rules).decision == decision


def test_degraded_features_are_those_of_nothing_unusual() -> None:
    values = features(tx(), None, flagged=False)

    unusual = {"amount_vs_typical", "velocity_short", "new_device", "new_country",
               "travel_speed", "new_payee", "recipient_payers"}  # fmt: skip
    assert all(values[name] == 0.0 for name in unusual)
    assert list(values) == list(FEATURES)


# ---------------------------------------------------------------- reading a request


def command(**overrides: Any) -> ScoreCommand:
    base = ScoreCommand(str(uuid.uuid4()), str(uuid.uuid4()), "P2P_OUT", 100, "USD")
    return replace(base, **overrides)


def test_a_transaction_without_a_time_happens_now() -> None:
    assert read_transaction(command(), NOW).at == NOW


def test_an_ip_is_kept_in_its_canonical_form() -> None:
    assert read_transaction(command(ip="2001:DB8:0::1"), NOW).ip == "2001:db8::1"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [({"timestamp": NOW + 301}, "INVALID_TIMESTAMP"), ({"timestamp": -1.0}, "INVALID_TIMESTAMP"),
     ({"type": "x" * 41}, "INVALID_TYPE"), ({"recipient_id": "nope"}, "INVALID_ID")],
)  # fmt: skip
def test_a_bad_request_is_refused_with_its_reason(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        read_transaction(command(**overrides), NOW)

    assert raised.value.reason == reason
