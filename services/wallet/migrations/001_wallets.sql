-- Users, their wallets, the ledger accounts behind each currency balance,
-- and the payments the wallet orchestrates.

CREATE TABLE users (
    user_id          uuid PRIMARY KEY,
    email            text        NOT NULL,
    phone            text,
    username         text,
    full_name        text        NOT NULL DEFAULT '',
    company_id       uuid,
    role             smallint    NOT NULL CHECK (role IN (1, 2, 3)),  -- user, manager, admin
    default_currency text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
-- Recipients are found by these; case does not make a different person.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
CREATE UNIQUE INDEX users_phone_key ON users (phone) WHERE phone IS NOT NULL;
CREATE UNIQUE INDEX users_username_key ON users (lower(username)) WHERE username IS NOT NULL;

CREATE TABLE wallets (
    wallet_id        uuid PRIMARY KEY,
    user_id          uuid        NOT NULL UNIQUE REFERENCES users (user_id),
    default_currency text        NOT NULL,
    status           smallint    NOT NULL DEFAULT 1 CHECK (status IN (1, 2, 3)),  -- active, frozen, closed
    initial_balance  bigint      NOT NULL DEFAULT 0 CHECK (initial_balance >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Each currency balance of a wallet is one USER_WALLET ledger account.
CREATE TABLE wallet_accounts (
    wallet_id         uuid        NOT NULL REFERENCES wallets (wallet_id),
    currency          text        NOT NULL,
    ledger_account_id uuid        NOT NULL UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (wallet_id, currency)
);

CREATE TABLE wallet_status_changes (
    change_id  uuid PRIMARY KEY,
    wallet_id  uuid        NOT NULL REFERENCES wallets (wallet_id),
    old_status smallint    NOT NULL,
    new_status smallint    NOT NULL,
    reason     text        NOT NULL,
    actor_id   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A P2P transfer, from the request to its outcome. The id is also the
-- ledger transfer's id, the fraud transaction id and the budget reference,
-- so that every step is idempotent on its own.
CREATE TABLE payments (
    payment_id        uuid PRIMARY KEY,
    kind              text        NOT NULL,
    sender_user_id    uuid        NOT NULL REFERENCES users (user_id),
    idempotency_key   text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash      text        NOT NULL,
    recipient_user_id uuid        REFERENCES users (user_id),
    amount            bigint      NOT NULL CHECK (amount > 0),
    currency          text        NOT NULL,
    note              text        NOT NULL DEFAULT '',
    status            text        NOT NULL CHECK (status IN ('PROCESSING', 'COMPLETED', 'FAILED')),
    failure_reason    text,
    failure_message   text,
    reservation_id    uuid,
    sender_balance    bigint,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sender_user_id, idempotency_key),
    CHECK (status <> 'FAILED' OR failure_reason IS NOT NULL),
    CHECK (status <> 'COMPLETED' OR sender_balance IS NOT NULL)
);
CREATE INDEX payments_sender_idx ON payments (sender_user_id, created_at DESC);
