-- A payment flagged for review waits as a ledger hold until the payer
-- confirms with their PIN, or the hold expires.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('PROCESSING', 'PENDING_REVIEW', 'COMPLETED', 'FAILED'));
ALTER TABLE payments ADD COLUMN review_expires_at timestamptz;
ALTER TABLE payments ADD CONSTRAINT payments_review_has_expiry
    CHECK (status <> 'PENDING_REVIEW' OR (review_expires_at IS NOT NULL AND sender_balance IS NOT NULL));
CREATE INDEX payments_review_idx ON payments (review_expires_at) WHERE status = 'PENDING_REVIEW';
