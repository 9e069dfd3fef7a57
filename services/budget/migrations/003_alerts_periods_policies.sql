-- Events leave through the outbox (services/common/outbox.py).
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    event_type   text        NOT NULL,
    routing_key  text        NOT NULL,
    aggregate_id text        NOT NULL,
    envelope     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;

-- What each period announced: a threshold (or the crossing of its total) is
-- announced once per period, whatever the retries or the concurrency. A
-- period is a budgets row, so the budget id names the period.
CREATE TABLE budget_alerts (
    budget_id  uuid        NOT NULL REFERENCES budgets (budget_id),
    kind       text        NOT NULL CHECK (kind IN ('THRESHOLD', 'EXCEEDED')),
    threshold  integer     NOT NULL,
    event_id   uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (budget_id, kind, threshold)
);

-- Periods: every period of a budget is a budgets row; the next period points
-- at the one it follows (once: UNIQUE), and all share the first period's
-- start as the anchor of their calendar arithmetic. carried_over is the
-- unspent amount a ROLLOVER period took from the one before, included in
-- total_amount.
ALTER TABLE budgets
    ADD COLUMN period_anchor      timestamptz,
    ADD COLUMN previous_budget_id uuid UNIQUE REFERENCES budgets (budget_id),
    ADD COLUMN carried_over       bigint NOT NULL DEFAULT 0 CHECK (carried_over >= 0),
    ADD COLUMN policy_key         text;
UPDATE budgets SET period_anchor = start_date;
ALTER TABLE budgets ALTER COLUMN period_anchor SET NOT NULL;
CREATE INDEX budgets_period_end_idx ON budgets (end_date) WHERE status IN (1, 3);
CREATE INDEX budgets_company_idx ON budgets (company_id, created_at, budget_id);
CREATE INDEX budgets_list_idx ON budgets (created_at, budget_id);
-- A company policy entry gives a user one budget series, once.
CREATE UNIQUE INDEX budgets_policy_once ON budgets (user_id, policy_key)
    WHERE policy_key IS NOT NULL AND previous_budget_id IS NULL;

-- Default budgets of a company's new users, editable by admins.
CREATE TABLE company_policies (
    company_id uuid PRIMARY KEY,
    budgets    jsonb       NOT NULL,
    updated_by text        NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
