-- The ledger's schema. Money is bigint minor units. The database enforces
-- every invariant the engine relies on, as the last line of defence.

CREATE TABLE accounts (
    id               uuid PRIMARY KEY,
    currency         text        NOT NULL CHECK (currency ~ '^[A-Z]{3,4}$'),
    type             smallint    NOT NULL CHECK (type BETWEEN 1 AND 9),
    normal_side      smallint    NOT NULL CHECK (normal_side IN (1, 2)),  -- 1 debit, 2 credit
    no_overdraft     boolean     NOT NULL DEFAULT false,
    overdraft_limit  bigint      NOT NULL DEFAULT 0 CHECK (overdraft_limit >= 0),
    status           smallint    NOT NULL DEFAULT 1 CHECK (status IN (1, 2)),  -- 1 open, 2 closed
    metadata         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    debits_posted    bigint      NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted   bigint      NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending   bigint      NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending  bigint      NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz,
    -- Debits, posted and held, never exceed posted credits plus the limit.
    CONSTRAINT accounts_no_overdraft CHECK (
        NOT no_overdraft OR debits_posted + debits_pending <= credits_posted + overdraft_limit
    )
);

CREATE TABLE transfers (
    id                uuid PRIMARY KEY,
    debit_account_id  uuid        NOT NULL REFERENCES accounts (id),
    credit_account_id uuid        NOT NULL REFERENCES accounts (id),
    amount            bigint      NOT NULL CHECK (amount > 0),
    currency          text        NOT NULL,
    type              smallint    NOT NULL CHECK (type BETWEEN 1 AND 5),
    pending_id        uuid        REFERENCES transfers (id),
    reverses_id       uuid        REFERENCES transfers (id),
    linked            boolean     NOT NULL DEFAULT false,
    timeout_seconds   integer     NOT NULL DEFAULT 0 CHECK (timeout_seconds >= 0),
    code              text        NOT NULL DEFAULT '',
    metadata          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- NULL when the client gave none: the transfer takes effect when created.
    effective_at      timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    -- The only mutable columns: a hold's resolution and the amount reversed.
    status            smallint    NOT NULL CHECK (status BETWEEN 1 AND 5),
    amount_reversed   bigint      NOT NULL DEFAULT 0,
    CONSTRAINT transfers_distinct_accounts CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT transfers_reversed_at_most_once CHECK (amount_reversed BETWEEN 0 AND amount),
    CONSTRAINT transfers_pending_ref CHECK ((type IN (3, 4)) = (pending_id IS NOT NULL)),
    CONSTRAINT transfers_reversal_ref CHECK ((type = 5) = (reverses_id IS NOT NULL))
);

CREATE INDEX transfers_debit_account_idx ON transfers (debit_account_id, created_at DESC, id DESC);
CREATE INDEX transfers_credit_account_idx ON transfers (credit_account_id, created_at DESC, id DESC);
CREATE INDEX transfers_open_holds_idx ON transfers (expires_at) WHERE status = 2;
CREATE UNIQUE INDEX transfers_one_resolution_per_hold ON transfers (pending_id) WHERE pending_id IS NOT NULL;

-- Entries: one per account per posted movement, partitioned by month.
CREATE TABLE entries (
    id            bigint GENERATED ALWAYS AS IDENTITY,
    transfer_id   uuid        NOT NULL,
    account_id    uuid        NOT NULL,
    side          smallint    NOT NULL CHECK (side IN (1, 2)),  -- 1 debit, 2 credit
    amount        bigint      NOT NULL CHECK (amount > 0),
    currency      text        NOT NULL,
    balance_after bigint      NOT NULL,
    code          text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE entries_default PARTITION OF entries DEFAULT;
CREATE INDEX entries_account_idx ON entries (account_id, created_at DESC, id DESC);
CREATE INDEX entries_transfer_idx ON entries (transfer_id);

-- Creates the monthly partition that holds `at`, if missing. The service
-- calls it at start for this month and the next few.
CREATE FUNCTION ensure_entries_partition(at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := 'entries_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF entries FOR VALUES FROM (%L) TO (%L)',
            name, month_start, month_start + interval '1 month');
    END IF;
END $$;

SELECT ensure_entries_partition(now() + make_interval(months => m)) FROM generate_series(0, 2) AS m;

-- Entries are append-only: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION entries_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER entries_no_update_delete BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION entries_are_append_only();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION entries_are_append_only();
