"""The ledger's gRPC servicer: proto → handler → proto. No decisions here."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import cast

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from moneta.ledger.v1 import ledger_pb2 as pb
from moneta.ledger.v1 import ledger_pb2_grpc
from services.common.grpc_util import optional_timestamp, timestamp
from services.ledger import handlers
from services.ledger.domain import (
    AccountSpec,
    AccountState,
    Side,
    Transfer,
    TransferCode,
    TransferOutcome,
    TransferSpec,
)
from services.ledger.engine import TransferEngine
from services.ledger.store import account_state

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name


def balance_to_pb(state: AccountState, as_of: datetime | None = None) -> pb.Balance:
    pending_in, pending_out = (
        (state.credits_pending, state.debits_pending)
        if state.normal_side == Side.CREDIT
        else (state.debits_pending, state.credits_pending)
    )
    return pb.Balance(
        account_id=str(state.id),
        currency=state.currency,
        debits_posted=state.debits_posted,
        credits_posted=state.credits_posted,
        debits_pending=state.debits_pending,
        credits_pending=state.credits_pending,
        posted=state.posted,
        pending=pending_in - pending_out,
        available=state.posted - pending_out,
        as_of=timestamp(as_of),
    )


@functools.lru_cache(maxsize=64)
def _timestamp(at: datetime) -> Timestamp:
    # A batch's transfers share one moment: convert it once. Callers copy it.
    converted = timestamp(at)
    assert converted is not None
    return converted


def transfer_to_pb(t: Transfer) -> pb.Transfer:
    """The wire form of a stored transfer."""
    message = pb.Transfer()
    _fill_transfer(message, t, str(t.id))
    return message


def _fill_transfer(message: pb.Transfer, t: Transfer, id_text: str) -> None:
    """Sets a transfer's fields on a message in place (a message built
    apart and copied in costs twice as much). Fields at their defaults are
    left unset, which is both what proto3 sends and cheaper."""
    message.id = id_text
    message.debit_account_id = str(t.debit_account_id)
    message.credit_account_id = str(t.credit_account_id)
    message.amount = t.amount
    message.currency = t.currency
    message.type = cast(pb.TransferType.ValueType, int(t.type))
    if t.linked:
        message.linked = True
    if t.timeout_seconds:
        message.timeout_seconds = t.timeout_seconds
    if t.code:
        message.code = t.code
    message.status = cast(pb.TransferStatus.ValueType, int(t.status))
    message.effective_at.CopyFrom(_timestamp(t.effective_at or t.created_at))
    message.created_at.CopyFrom(_timestamp(t.created_at))
    if t.pending_id is not None:
        message.pending_id = str(t.pending_id)
    if t.reverses_id is not None:
        message.reverses_id = str(t.reverses_id)
    if t.metadata:
        message.metadata.update({k: str(v) for k, v in t.metadata.items()})
    if t.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp(t.expires_at))


def transfer_from_pb(t: pb.Transfer) -> TransferSpec:
    metadata = t.metadata
    return TransferSpec(
        id=t.id,
        debit_account_id=t.debit_account_id,
        credit_account_id=t.credit_account_id,
        amount=t.amount,
        currency=t.currency,
        type=t.type,
        pending_id=t.pending_id,
        reverses_id=t.reverses_id,
        linked=t.linked,
        timeout_seconds=t.timeout_seconds,
        code=t.code,
        # Most transfers carry none; copying an empty map costs more than {}.
        metadata=dict(metadata) if metadata else {},
        effective_at=optional_timestamp(t, "effective_at"),
    )


_RESULT_CODES = {code: pb.TransferResult.Code.Value(code.value) for code in TransferCode}


def outcomes_to_pb(outcomes: Sequence[TransferOutcome]) -> pb.CreateTransfersResponse:
    """One result per transfer, each built in place in the response."""
    response = pb.CreateTransfersResponse()
    add = response.results.add
    for outcome in outcomes:
        result = add(id=outcome.id, code=_RESULT_CODES[outcome.code])
        if outcome.transfer is not None:
            _fill_transfer(result.transfer, outcome.transfer, outcome.id)
    return response


def account_to_pb(row: asyncpg.Record) -> pb.Account:
    return pb.Account(
        id=str(row["id"]),
        currency=row["currency"],
        type=row["type"],
        normal_side=row["normal_side"],
        no_overdraft=row["no_overdraft"],
        overdraft_limit=row["overdraft_limit"],
        metadata={k: str(v) for k, v in row["metadata"].items()},
        status=row["status"],
        balance=balance_to_pb(account_state(row)),
        created_at=timestamp(row["created_at"]),
    )


class LedgerApi(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, pool: asyncpg.Pool, engine: TransferEngine) -> None:
        self._pool = pool
        self._engine = engine

    async def CreateAccounts(
        self, request: pb.CreateAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateAccountsResponse:
        specs = [
            AccountSpec(
                id=a.id,
                currency=a.currency,
                type=a.type,
                normal_side=a.normal_side,
                no_overdraft=a.no_overdraft,
                overdraft_limit=a.overdraft_limit,
                metadata=dict(a.metadata),
            )
            for a in request.accounts
        ]
        results = await handlers.create_accounts(self._pool, specs)
        return pb.CreateAccountsResponse(
            results=[
                pb.AccountResult(id=aid, code=pb.AccountResult.Code.Value(code.value))
                for aid, code in results
            ]
        )

    async def LookupAccounts(
        self, request: pb.LookupAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupAccountsResponse:
        rows = await handlers.lookup_accounts(self._pool, list(request.ids))
        return pb.LookupAccountsResponse(accounts=[account_to_pb(r) for r in rows])

    async def CreateTransfers(
        self, request: pb.CreateTransfersRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTransfersResponse:
        specs = [transfer_from_pb(t) for t in request.transfers]
        handlers.check_batch_size(len(specs))
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        outcomes = await self._engine.submit(specs, deadline)
        return outcomes_to_pb(outcomes)

    async def GetBalances(
        self, request: pb.GetBalancesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBalancesResponse:
        as_of = optional_timestamp(request, "as_of")
        states, at = await handlers.get_balances(self._pool, list(request.account_ids), as_of)
        return pb.GetBalancesResponse(balances=[balance_to_pb(s, at) for s in states])

    async def LookupTransfers(
        self, request: pb.LookupTransfersRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupTransfersResponse:
        found = await handlers.lookup_transfers(self._pool, list(request.ids))
        return pb.LookupTransfersResponse(transfers=[transfer_to_pb(t) for t in found])

    async def CloseAccount(
        self, request: pb.CloseAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseAccountResponse:
        row = await handlers.close_account(self._pool, request.id, request.reason)
        return pb.CloseAccountResponse(account=account_to_pb(row))

    async def ListTransfers(
        self, request: pb.ListTransfersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTransfersResponse:
        query = handlers.TransferQuery(
            account_id=request.account_id,
            start=optional_timestamp(request, "start_time"),
            end=optional_timestamp(request, "end_time"),
            code=request.code or None,
            min_amount=request.min_amount or None,
            max_amount=request.max_amount or None,
            status=request.status or None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page, token = await handlers.list_transfers(self._pool, query)
        return pb.ListTransfersResponse(
            transfers=[transfer_to_pb(t) for t in page], next_page_token=token
        )

    async def ListEntries(
        self, request: pb.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEntriesResponse:
        query = handlers.EntryQuery(
            account_id=request.account_id,
            start=optional_timestamp(request, "start_time"),
            end=optional_timestamp(request, "end_time"),
            code=request.code or None,
            min_amount=request.min_amount or None,
            max_amount=request.max_amount or None,
            side=request.side or None,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page, token = await handlers.list_entries(self._pool, query)
        return pb.ListEntriesResponse(
            entries=[
                pb.Entry(
                    id=str(row["id"]),
                    transfer_id=str(row["transfer_id"]),
                    account_id=str(row["account_id"]),
                    side=row["side"],
                    amount=row["amount"],
                    currency=row["currency"],
                    balance_after=row["balance_after"],
                    code=row["code"],
                    created_at=timestamp(row["created_at"]),
                )
                for row in page
            ],
            next_page_token=token,
        )

    async def VerifyLedger(
        self, request: pb.VerifyLedgerRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyLedgerResponse:
        discrepancies, counts = await handlers.verify_ledger(self._pool)
        return pb.VerifyLedgerResponse(
            ok=not discrepancies,
            discrepancies=[
                pb.Discrepancy(
                    kind=str(d["kind"]),
                    account_id=str(d.get("account_id", "")),
                    currency=str(d.get("currency", "")),
                    expected=int(str(d.get("expected", 0))),
                    actual=int(str(d.get("actual", 0))),
                    detail=str(d.get("detail", "")),
                )
                for d in discrepancies
            ],
            accounts_checked=counts["accounts"],
            transfers_checked=counts["transfers"],
            entries_checked=counts["entries"],
        )
