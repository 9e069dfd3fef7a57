-- Merchants (their settlement accounts and QR signing keys), payments to
-- them, and currency exchange (quotes and their executions).

CREATE TABLE merchants (
    merchant_id           uuid PRIMARY KEY,
    name                  text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- The currency of the first settlement account and of in-app checkout
    -- when none is given.
    currency              text        NOT NULL,
    -- Ed25519, raw: the public key verifies the merchant's QR codes; the
    -- private key is sealed with AES-256-GCM (12-byte nonce || ciphertext).
    public_key            bytea       NOT NULL CHECK (length(public_key) = 32),
    private_key_encrypted bytea       NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now()
);

-- One MERCHANT ledger account per merchant and currency, opened on first use.
CREATE TABLE merchant_accounts (
    merchant_id       uuid        NOT NULL REFERENCES merchants (merchant_id),
    currency          text        NOT NULL,
    ledger_account_id uuid        NOT NULL UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, currency)
);

-- What a payment of kind MERCHANT pays, written in the same transaction as
-- its payments row.
CREATE TABLE merchant_payments (
    payment_id  uuid PRIMARY KEY REFERENCES payments (payment_id),
    merchant_id uuid NOT NULL REFERENCES merchants (merchant_id),
    -- The QR code's reference; NULL for in-app checkout.
    reference   text CHECK (reference IS NULL OR length(reference) BETWEEN 1 AND 100),
    category    text NOT NULL
);
CREATE INDEX merchant_payments_merchant_idx ON merchant_payments (merchant_id);

-- A QR code pays once: each (merchant, reference) belongs to the payment
-- that claimed it. Another payment takes it over only once that one FAILED.
CREATE TABLE qr_references (
    merchant_id uuid        NOT NULL REFERENCES merchants (merchant_id),
    reference   text        NOT NULL,
    payment_id  uuid        NOT NULL REFERENCES payments (payment_id),
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant_id, reference)
);

-- A quote: what an exchange would give, valid until expires_at.
-- to_amount = floor(from_amount × rate) in minor units of to_currency.
CREATE TABLE fx_quotes (
    quote_id      uuid PRIMARY KEY,
    user_id       uuid        NOT NULL REFERENCES users (user_id),
    from_currency text        NOT NULL,
    to_currency   text        NOT NULL CHECK (to_currency <> from_currency),
    from_amount   bigint      NOT NULL CHECK (from_amount > 0),
    to_amount     bigint      NOT NULL CHECK (to_amount > 0),
    rate          numeric     NOT NULL CHECK (rate > 0),
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The execution that claimed the quote (another may take it over only
    -- once that one FAILED).
    exchange_id   uuid
);

-- A quote's execution, idempotent per user and key. Its id is also the id of
-- the chain's first ledger transfer.
CREATE TABLE fx_exchanges (
    exchange_id     uuid PRIMARY KEY,
    user_id         uuid        NOT NULL REFERENCES users (user_id),
    idempotency_key text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    quote_id        uuid        NOT NULL REFERENCES fx_quotes (quote_id),
    status          text        NOT NULL CHECK (status IN ('PROCESSING', 'COMPLETED', 'FAILED')),
    failure_reason  text,
    failure_message text,
    -- The answer replayed to a retry: the wallet's balances right after.
    balances        jsonb,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key),
    CHECK (status <> 'FAILED' OR failure_reason IS NOT NULL),
    CHECK (status <> 'COMPLETED' OR balances IS NOT NULL)
);
-- A quote executes once: at most one execution that has not failed.
CREATE UNIQUE INDEX fx_exchanges_quote_once ON fx_exchanges (quote_id) WHERE status <> 'FAILED';
CREATE INDEX fx_exchanges_processing_idx ON fx_exchanges (updated_at) WHERE status = 'PROCESSING';
ALTER TABLE fx_quotes
    ADD CONSTRAINT fx_quotes_exchange_fkey FOREIGN KEY (exchange_id)
    REFERENCES fx_exchanges (exchange_id);
CREATE INDEX fx_quotes_user_idx ON fx_quotes (user_id, created_at DESC);
