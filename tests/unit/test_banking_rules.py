"""The rules of money in and out: when a bank transfer should complete, how
a bank account number is kept, what a settlement does, and how the bank
partner's webhook is authenticated."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.common.errors import Internal, InvalidArgument, Unauthenticated
from services.gateway.routes_banking import verify_webhook_signature, webhook_signature
from services.wallet import banking
from services.wallet.banking import Action, settlement_action

KEY = bytes(range(32))
ACCOUNT = uuid.UUID("8d4d1f5e-4f8e-4c7b-9a0e-2b1d3c4e5f60")
SECRET = b"whsec-test"
NOW = 1_800_000_000


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- business days


def test_business_days_skip_the_weekend() -> None:
    friday = at("2026-11-20T10:00")

    assert banking.add_business_days(friday, 1) == at("2026-11-23T10:00")  # Monday
    assert banking.add_business_days(friday, 3) == at("2026-11-25T10:00")  # Wednesday


def test_a_request_before_the_cutoff_on_a_business_day_completes_two_business_days_later() -> None:
    tuesday_morning = at("2026-11-17T09:30")

    assert banking.estimated_completion(tuesday_morning) == at("2026-11-19T09:30")


def test_a_request_after_the_cutoff_completes_three_business_days_later() -> None:
    friday_evening = at("2026-11-20T18:00")

    assert banking.estimated_completion(friday_evening) == at("2026-11-25T18:00")  # Wednesday


def test_a_weekend_request_starts_on_monday() -> None:
    saturday, sunday = at("2026-11-21T08:00"), at("2026-11-22T23:59")

    assert banking.estimated_completion(saturday).date() == at("2026-11-25T00:00").date()
    assert banking.estimated_completion(sunday).date() == at("2026-11-25T00:00").date()


def test_the_estimate_is_always_a_business_day_two_to_five_calendar_days_ahead() -> None:
    start = at("2026-11-16T00:00")
    for hour in range(0, 14 * 24, 5):
        requested = start + timedelta(hours=hour)
        done = banking.estimated_completion(requested)
        assert banking.is_business_day(done.date())
        assert timedelta(days=2) <= done - requested <= timedelta(days=5)


def test_the_estimate_of_a_request_in_another_timezone_is_in_utc() -> None:
    from zoneinfo import ZoneInfo

    # 17:00 in New York is 22:00 UTC: after the cut-off.
    requested = datetime(2026, 11, 17, 17, 0, tzinfo=ZoneInfo("America/New_York"))

    assert banking.estimated_completion(requested) == at("2026-11-20T22:00")


# -- bank account numbers


def test_an_account_number_decrypts_to_what_was_encrypted() -> None:
    blob = banking.encrypt_account_number(KEY, "000123456789", ACCOUNT)

    assert banking.decrypt_account_number(KEY, blob, ACCOUNT) == "000123456789"
    assert b"123456789" not in blob


def test_each_encryption_uses_a_fresh_nonce() -> None:
    first = banking.encrypt_account_number(KEY, "000123456789", ACCOUNT)
    second = banking.encrypt_account_number(KEY, "000123456789", ACCOUNT)

    assert first[:12] != second[:12]
    assert first != second


def test_a_ciphertext_moved_to_another_account_does_not_decrypt() -> None:
    blob = banking.encrypt_account_number(KEY, "000123456789", ACCOUNT)

    with pytest.raises(Internal) as caught:
        banking.decrypt_account_number(KEY, blob, uuid.uuid4())
    assert caught.value.reason == "BANK_ACCOUNT_UNREADABLE"


def test_a_tampered_ciphertext_does_not_decrypt() -> None:
    blob = bytearray(banking.encrypt_account_number(KEY, "000123456789", ACCOUNT))
    blob[15] ^= 1

    with pytest.raises(Internal):
        banking.decrypt_account_number(KEY, bytes(blob), ACCOUNT)


def test_only_the_last_four_digits_are_shown() -> None:
    assert banking.last4("000123456789") == "6789"


def test_the_fingerprint_finds_the_same_account_and_tells_others_apart() -> None:
    same = banking.account_fingerprint(KEY, "021000021", "000123456789")

    assert banking.account_fingerprint(KEY, "021000021", "000123456789") == same
    assert banking.account_fingerprint(KEY, "011000015", "000123456789") != same
    assert banking.account_fingerprint(bytes(32), "021000021", "000123456789") != same
    assert "123456789" not in same


def test_the_key_setting_must_be_base64_of_32_bytes() -> None:
    assert banking.account_key(base64.b64encode(KEY).decode()) == KEY
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(Internal) as caught:
            banking.account_key(bad)
        assert caught.value.reason == "BANK_ACCOUNT_KEY_INVALID"


def test_the_development_key_is_usable() -> None:
    from services.wallet.config import WalletSettings

    default = WalletSettings.model_fields["bank_account_key"].default
    assert len(banking.account_key(default)) == 32


@pytest.mark.parametrize(
    "number", ["", "123", "12345678901234567890", "1234 5678", "12a45", "١٢٣٤٥"]
)
def test_account_numbers_are_4_to_17_digits(number: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        banking.validate_account_number(number)
    assert caught.value.reason == "INVALID_ACCOUNT_NUMBER"


@pytest.mark.parametrize("routing", ["021000021", "011000015", "121000358"])
def test_valid_routing_numbers_are_accepted(routing: str) -> None:
    assert banking.validate_routing_number(routing) == routing


@pytest.mark.parametrize("routing", ["", "02100002", "0210000210", "02100002x", "021000022"])
def test_routing_numbers_are_nine_digits_with_a_valid_check_digit(routing: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        banking.validate_routing_number(routing)
    assert caught.value.reason == "INVALID_ROUTING_NUMBER"


def test_the_holder_name_is_required_and_tidied() -> None:
    assert banking.validate_holder_name("  Ada   Lovelace ") == "Ada Lovelace"
    with pytest.raises(InvalidArgument) as caught:
        banking.validate_holder_name("   ")
    assert caught.value.reason == "INVALID_HOLDER_NAME"


# -- settlements


@pytest.mark.parametrize(
    ("current", "reported", "action"),
    [
        ("PENDING", "SETTLED", Action.POST),
        ("PENDING", "FAILED", Action.VOID),
        ("COMPLETED", "RETURNED", Action.REVERSE),
        # The same report twice changes nothing.
        ("COMPLETED", "SETTLED", Action.NOTHING),
        ("FAILED", "FAILED", Action.NOTHING),
        ("REVERSED", "RETURNED", Action.NOTHING),
        # A late copy of the settlement a return followed.
        ("REVERSED", "SETTLED", Action.NOTHING),
        # Contradictions.
        ("COMPLETED", "FAILED", Action.CONFLICT),
        ("FAILED", "SETTLED", Action.CONFLICT),
        ("FAILED", "RETURNED", Action.CONFLICT),
        ("REFUSED", "SETTLED", Action.CONFLICT),
        # Too early.
        ("PENDING", "RETURNED", Action.OUT_OF_ORDER),
        ("PROCESSING", "SETTLED", Action.OUT_OF_ORDER),
    ],
)
def test_what_a_settlement_does(current: str, reported: str, action: Action) -> None:
    assert settlement_action(current, reported) == action


def test_every_ledger_step_of_a_transfer_has_its_own_stable_id() -> None:
    tid = banking.bank_transfer_id(ACCOUNT, "key-1")
    ids = {
        tid,
        banking.settlement_transfer_id(tid),
        banking.void_transfer_id(tid),
        banking.return_transfer_id(tid),
        banking.debt_id_for(tid),
        banking.bank_request_id(tid),
    }

    assert len(ids) == 6
    assert banking.bank_transfer_id(ACCOUNT, "key-1") == tid
    assert banking.bank_transfer_id(ACCOUNT, "key-2") != tid
    debt = banking.debt_id_for(tid)
    assert banking.repayment_transfer_id(debt, 0) != banking.repayment_transfer_id(debt, 500)


def test_relay_retries_back_off_to_five_minutes() -> None:
    delays = [banking.retry_delay_seconds(n) for n in range(1, 12)]

    assert delays[:4] == [1, 2, 4, 8]
    assert max(delays) == 300
    assert delays == sorted(delays)


# -- the webhook signature


def signature_header(body: bytes, t: int = NOW, secret: bytes = SECRET) -> str:
    digest = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def refusal(header: str | None, body: bytes = b"{}", now: float = NOW) -> str:
    with pytest.raises(Unauthenticated) as caught:
        verify_webhook_signature(SECRET, header, body, now)
    return caught.value.reason


def test_the_signature_is_the_hmac_of_timestamp_dot_body() -> None:
    body = b'{"transfer_id":"x"}'
    expected = hmac.new(SECRET, b"1800000000." + body, hashlib.sha256).hexdigest()

    assert webhook_signature(SECRET, NOW, body) == expected


def test_a_correct_recent_signature_is_accepted() -> None:
    body = b'{"status":"SETTLED"}'

    verify_webhook_signature(SECRET, signature_header(body), body, NOW + 299)


def test_one_matching_signature_among_several_is_enough() -> None:
    body = b"{}"
    good = signature_header(body).split(",")[1]

    verify_webhook_signature(SECRET, f"t={NOW},v1={'0' * 64},{good}", body, NOW)


def test_a_signature_of_another_body_or_secret_is_invalid() -> None:
    assert refusal(signature_header(b'{"amount":1}'), b'{"amount":2}') == (
        "WEBHOOK_SIGNATURE_INVALID"
    )
    assert refusal(signature_header(b"{}", secret=b"other")) == "WEBHOOK_SIGNATURE_INVALID"


def test_a_signature_older_than_five_minutes_is_expired() -> None:
    assert refusal(signature_header(b"{}", t=NOW - 301)) == "WEBHOOK_EXPIRED"
    assert refusal(signature_header(b"{}", t=NOW + 301)) == "WEBHOOK_EXPIRED"


@pytest.mark.parametrize(
    "header",
    [None, "", "garbage", f"t={NOW}", "v1=abc", f"t=-5,v1={'0' * 64}", f"t={NOW},t={NOW},v1=00",
     f"t={NOW},v1=é"],
)  # fmt: skip
def test_a_missing_or_malformed_header_is_invalid(header: str | None) -> None:
    assert refusal(header) == "WEBHOOK_SIGNATURE_INVALID"
