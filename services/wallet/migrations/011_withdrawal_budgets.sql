-- A withdrawal is spend: it reserves the payer's budgets (category CASH_OUT)
-- before its hold, commits them once the hold is placed, and gives the spend
-- back if the bank fails or returns the payout. Deposits reserve nothing.
ALTER TABLE bank_transfers ADD COLUMN reservation_id uuid;
ALTER TABLE bank_transfers
    ADD CONSTRAINT bank_transfers_reservation_withdrawal
    CHECK (reservation_id IS NULL OR kind = 'WITHDRAWAL');

-- An attempt at a transfer still PROCESSING holds it for a while: the
-- reconciler, or another attempt with the same key, leaves it alone meanwhile
-- (so one of them cannot refuse it while the other places its hold).
ALTER TABLE bank_transfers ADD COLUMN lease_until timestamptz;

-- A payout that failed or came back owes its spend back to the budgets; this
-- says when the budget took it back. Owed and not yet given back: the
-- banking relay's sweep gives it back (the refund is idempotent).
ALTER TABLE bank_transfers ADD COLUMN budget_given_back_at timestamptz;
CREATE INDEX bank_transfers_budget_owed_idx ON bank_transfers (updated_at)
    WHERE kind = 'WITHDRAWAL' AND status IN ('FAILED', 'REVERSED')
      AND reservation_id IS NOT NULL AND budget_given_back_at IS NULL;
