-- The events the wallet's consumers applied (services/common/consumer.py),
-- each recorded in the transaction that completed its effect: a redelivered
-- event is seen here, acknowledged and ignored.
CREATE TABLE inbox (
    consumer   text        NOT NULL CHECK (length(consumer) BETWEEN 1 AND 100),
    event_id   uuid        NOT NULL,
    event_type text        NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX inbox_applied_at_idx ON inbox (applied_at);

-- Users whose onboarding (user, wallet, default budgets from the company's
-- policy) is complete: a later UserCreated for the same user, whatever its
-- event id, applies the policy no more.
CREATE TABLE onboardings (
    user_id      uuid        PRIMARY KEY REFERENCES users (user_id),
    budgets      integer     NOT NULL CHECK (budgets >= 0),
    completed_at timestamptz NOT NULL DEFAULT now()
);
