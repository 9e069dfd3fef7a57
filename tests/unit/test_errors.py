"""Domain errors on the wire: a status with a code, a message and an
ErrorInfo carrying the machine reason, and back again on the caller's side."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common.errors import (
    ERROR_DOMAIN,
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MonetaError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
    to_grpc_status,
)

DETAILS_KEY = "grpc-status-details-bin"

ALL_ERRORS: list[type[MonetaError]] = [
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Aborted,
    ResourceExhausted,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
    Internal,
]


def insufficient_funds() -> FailedPrecondition:
    return FailedPrecondition(
        "account cannot pay",
        reason="INSUFFICIENT_FUNDS",
        details={"account_id": "a1", "shortfall": 250},
    )


def status_details(status: grpc.Status) -> status_pb2.Status:
    (value,) = [v for k, v in status.trailing_metadata if k == DETAILS_KEY]
    return status_pb2.Status.FromString(value)


def error_info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    (detail,) = status_details(status).details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    return info


def rpc_error(
    code: grpc.StatusCode,
    details: str | None = None,
    trailing: tuple[tuple[str, str | bytes], ...] = (),
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailing),
        details=details,
    )


def over_the_wire(error: MonetaError) -> MonetaError:
    status = to_grpc_status(error)
    return from_rpc_error(rpc_error(status.code, status.details, status.trailing_metadata))


# ---------------------------------------------------------------- errors


def test_reason_defaults_to_the_class_reason() -> None:
    assert NotFound("no such account").reason == "NOT_FOUND"


def test_details_are_kept_as_strings() -> None:
    assert insufficient_funds().details == {"account_id": "a1", "shortfall": "250"}


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (Aborted, grpc.StatusCode.ABORTED),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
        (Internal, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_class_has_its_status_code(
    cls: type[MonetaError], code: grpc.StatusCode
) -> None:
    assert cls.status_code == code


# ---------------------------------------------------------------- to the wire


def test_status_carries_the_error_code() -> None:
    assert to_grpc_status(insufficient_funds()).code == grpc.StatusCode.FAILED_PRECONDITION


def test_status_carries_the_message() -> None:
    assert to_grpc_status(insufficient_funds()).details == "account cannot pay"


def test_status_details_repeat_the_numeric_code_and_message() -> None:
    details = status_details(to_grpc_status(insufficient_funds()))
    assert (details.code, details.message) == (9, "account cannot pay")


def test_status_details_hold_an_error_info_with_the_reason() -> None:
    info = error_info(to_grpc_status(insufficient_funds()))
    assert (info.reason, info.domain) == ("INSUFFICIENT_FUNDS", ERROR_DOMAIN)


def test_error_info_metadata_holds_the_details() -> None:
    info = error_info(to_grpc_status(insufficient_funds()))
    assert dict(info.metadata) == {"account_id": "a1", "shortfall": "250"}


# ---------------------------------------------------------------- from the wire


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_peer_error_comes_back_as_the_same_class(cls: type[MonetaError]) -> None:
    assert type(over_the_wire(cls("refused", reason="SOME_REASON"))) is cls


def test_peer_error_comes_back_with_its_reason() -> None:
    assert over_the_wire(insufficient_funds()).reason == "INSUFFICIENT_FUNDS"


def test_peer_error_comes_back_with_its_details() -> None:
    assert over_the_wire(insufficient_funds()).details == {"account_id": "a1", "shortfall": "250"}


def test_peer_error_comes_back_with_its_message() -> None:
    assert over_the_wire(insufficient_funds()).message == "account cannot pay"


def test_transport_unavailable_without_details_is_a_dependency_outage() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert (type(error), error.reason) == (Unavailable, "DEPENDENCY_UNAVAILABLE")


def test_transport_deadline_without_details_is_a_dependency_timeout() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert (type(error), error.reason) == (DeadlineExceeded, "DEPENDENCY_TIMEOUT")


def test_transport_failure_text_is_replaced_so_no_internal_address_leaks() -> None:
    error = from_rpc_error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: ipv4:10.0.0.7:50051: refused",
        )
    )

    assert error.message == "a dependency is unavailable"
    assert "10.0.0.7" not in str(error)


def test_unmapped_code_becomes_internal() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.DATA_LOSS, "disk on fire"))
    assert (type(error), error.reason) == (Internal, "INTERNAL")


def test_unrelated_trailing_metadata_is_ignored() -> None:
    error = from_rpc_error(
        rpc_error(grpc.StatusCode.NOT_FOUND, "gone", trailing=(("x-request-id", "r1"),))
    )
    assert (type(error), error.reason) == (NotFound, "NOT_FOUND")
