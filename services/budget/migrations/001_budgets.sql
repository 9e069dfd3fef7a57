-- Budgets, the reservations that hold spend against them, and their history.

CREATE TABLE budgets (
    budget_id       uuid PRIMARY KEY,
    user_id         uuid        NOT NULL,
    wallet_id       uuid,
    company_id      uuid,
    category        text        NOT NULL,
    currency        text        NOT NULL,
    total_amount    bigint      NOT NULL CHECK (total_amount > 0),
    used_amount     bigint      NOT NULL DEFAULT 0 CHECK (used_amount >= 0),
    reserved_amount bigint      NOT NULL DEFAULT 0 CHECK (reserved_amount >= 0),
    period_type     smallint    NOT NULL CHECK (period_type BETWEEN 1 AND 5),
    start_date      timestamptz NOT NULL,
    end_date        timestamptz NOT NULL,
    mode            smallint    NOT NULL CHECK (mode IN (1, 2)),      -- 1 hard, 2 soft
    rollover        smallint    NOT NULL CHECK (rollover IN (1, 2)),  -- 1 reset, 2 rollover
    thresholds      integer[]   NOT NULL DEFAULT '{80,100}',
    status          smallint    NOT NULL DEFAULT 1 CHECK (status BETWEEN 1 AND 3),
    created_by      text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT budgets_period CHECK (end_date > start_date),
    -- A hard budget is never overspent, whatever the code does.
    CONSTRAINT budgets_hard_limit CHECK (mode = 2 OR used_amount + reserved_amount <= total_amount)
);
CREATE INDEX budgets_user_idx ON budgets (user_id, status, category);

CREATE TABLE reservations (
    reservation_id uuid PRIMARY KEY,
    reference      text        NOT NULL UNIQUE,
    user_id        uuid        NOT NULL,
    amount         bigint      NOT NULL CHECK (amount > 0),
    currency       text        NOT NULL,
    category       text        NOT NULL,
    status         smallint    NOT NULL CHECK (status BETWEEN 1 AND 4),  -- reserved, committed, released, expired
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_open_idx ON reservations (expires_at) WHERE status = 1;

-- What a reservation holds on each budget it was charged to.
CREATE TABLE reservation_lines (
    reservation_id uuid   NOT NULL REFERENCES reservations (reservation_id),
    budget_id      uuid   NOT NULL REFERENCES budgets (budget_id),
    amount         bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (reservation_id, budget_id)
);

CREATE TABLE budget_history (
    history_id uuid PRIMARY KEY,
    budget_id  uuid        NOT NULL REFERENCES budgets (budget_id),
    action     text        NOT NULL,
    old_values jsonb,
    new_values jsonb,
    reason     text        NOT NULL DEFAULT '',
    actor_id   text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX budget_history_budget_idx ON budget_history (budget_id, created_at DESC);

CREATE FUNCTION budget_history_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'budget history is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER budget_history_append_only BEFORE UPDATE OR DELETE ON budget_history
    FOR EACH ROW EXECUTE FUNCTION budget_history_is_append_only();
