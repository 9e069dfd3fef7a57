-- The wallet's history: one row per movement as its owner sees it (a P2P
-- transfer is P2P_OUT on one wallet and P2P_IN on the other).

CREATE TABLE transactions (
    txn_id             uuid PRIMARY KEY,
    wallet_id          uuid        NOT NULL REFERENCES wallets (wallet_id),
    type               text        NOT NULL CHECK (type IN (
                           'P2P_IN', 'P2P_OUT', 'DEPOSIT', 'WITHDRAWAL', 'MERCHANT_PAYMENT',
                           'EXCHANGE', 'BOOKING', 'REFUND', 'ADJUSTMENT', 'CLAWBACK')),
    -- Signed from the wallet's point of view: negative when money leaves.
    amount             bigint      NOT NULL CHECK (amount <> 0),
    currency           text        NOT NULL,
    status             text        NOT NULL CHECK (status IN (
                           'PENDING', 'PENDING_REVIEW', 'COMPLETED', 'FAILED', 'REVERSED',
                           'EXPIRED')),
    counterparty       text        NOT NULL DEFAULT '',
    description        text        NOT NULL DEFAULT '',
    reference_id       text        NOT NULL DEFAULT '',
    ledger_transfer_id uuid,
    -- The wallet's posted balance in the currency right after the movement.
    balance_after      bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    search             tsvector GENERATED ALWAYS AS (
                           to_tsvector('simple', description || ' ' || counterparty)) STORED
);
-- The first page of any wallet, newest first, whatever its size.
CREATE INDEX transactions_wallet_idx ON transactions (wallet_id, created_at DESC, txn_id DESC);
CREATE INDEX transactions_wallet_type_idx
    ON transactions (wallet_id, type, created_at DESC, txn_id DESC);
CREATE INDEX transactions_search_idx ON transactions USING gin (search);
-- One history row per ledger transfer and wallet.
CREATE UNIQUE INDEX transactions_transfer_key
    ON transactions (ledger_transfer_id, wallet_id) WHERE ledger_transfer_id IS NOT NULL;
