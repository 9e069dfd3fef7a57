-- Money in from a bank and out to it: linked bank accounts, each deposit and
-- withdrawal from request to settlement, what the bank partner is still to be
-- told (an outbox), and what a wallet owes after a returned deposit it had
-- already spent.

CREATE TABLE bank_accounts (
    bank_account_id          uuid PRIMARY KEY,
    user_id                  uuid        NOT NULL REFERENCES users (user_id),
    -- AES-256-GCM: a 12-byte nonce, then the ciphertext and its 16-byte tag.
    -- The associated data is the bank_account_id, so a value cannot be moved
    -- to another row unnoticed.
    account_number_encrypted bytea       NOT NULL CHECK (length(account_number_encrypted) > 28),
    -- A keyed HMAC of routing and account number: the same account linked
    -- twice is found without decrypting anything.
    fingerprint              text        NOT NULL,
    last4                    text        NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    routing_number           text        NOT NULL CHECK (routing_number ~ '^[0-9]{9}$'),
    holder_name              text        NOT NULL CHECK (length(holder_name) BETWEEN 1 AND 200),
    created_at               timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, fingerprint)
);

-- A deposit (bank → wallet) or a withdrawal (wallet → bank). The id is the
-- ledger hold's id; the settlement's ledger transfers derive from it.
--   PROCESSING  recorded, the hold not yet known to be placed
--   REFUSED     refused before any money moved (a retry with the key replays it)
--   PENDING     held in the ledger, the bank told (bank_requests)
--   COMPLETED   settled by the bank: the hold posted
--   FAILED      failed at the bank: the hold voided
--   REVERSED    returned by the bank after settlement: the posting reversed
CREATE TABLE bank_transfers (
    transfer_id          uuid PRIMARY KEY,
    kind                 text        NOT NULL CHECK (kind IN ('DEPOSIT', 'WITHDRAWAL')),
    user_id              uuid        NOT NULL REFERENCES users (user_id),
    wallet_id            uuid        NOT NULL REFERENCES wallets (wallet_id),
    bank_account_id      uuid        NOT NULL REFERENCES bank_accounts (bank_account_id),
    idempotency_key      text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash         text        NOT NULL,
    amount               bigint      NOT NULL CHECK (amount > 0),
    currency             text        NOT NULL,
    status               text        NOT NULL CHECK (status IN (
                             'PROCESSING', 'REFUSED', 'PENDING', 'COMPLETED', 'FAILED',
                             'REVERSED')),
    estimated_completion timestamptz NOT NULL,
    failure_reason       text,
    failure_message      text,
    -- What the bank last reported.
    bank_reference       text,
    bank_reason          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key),
    CHECK (status <> 'REFUSED' OR failure_reason IS NOT NULL)
);
CREATE INDEX bank_transfers_processing_idx ON bank_transfers (updated_at)
    WHERE status = 'PROCESSING';

-- The outbox: a collection or payout the bank partner is to be told about,
-- written in the same transaction that makes the transfer PENDING, and sent
-- by the relay until the partner accepts it.
CREATE TABLE bank_requests (
    request_id      uuid PRIMARY KEY,
    transfer_id     uuid        NOT NULL UNIQUE REFERENCES bank_transfers (transfer_id),
    kind            text        NOT NULL CHECK (kind IN ('COLLECTION', 'PAYOUT')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    accepted_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bank_requests_due_idx ON bank_requests (next_attempt_at) WHERE accepted_at IS NULL;

-- What a wallet owes after the bank returned a deposit it had already spent.
-- The ledger holds the amount on a RECEIVABLE account; this says whose it is.
-- The id is the ledger transfer that recorded the debt.
CREATE TABLE bank_debts (
    debt_id     uuid PRIMARY KEY,
    wallet_id   uuid        NOT NULL REFERENCES wallets (wallet_id),
    currency    text        NOT NULL,
    transfer_id uuid        NOT NULL UNIQUE REFERENCES bank_transfers (transfer_id),
    amount      bigint      NOT NULL CHECK (amount > 0),
    repaid      bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (repaid BETWEEN 0 AND amount)
);
-- Incoming money looks here first: it must cost nothing when nothing is owed.
CREATE INDEX bank_debts_outstanding_idx ON bank_debts (wallet_id, currency, created_at)
    WHERE repaid < amount;
