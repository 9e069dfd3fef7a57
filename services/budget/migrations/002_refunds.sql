-- Spend given back (a cancelled booking), once per reference, never more
-- than the reservation committed.
ALTER TABLE reservations ADD COLUMN refunded bigint NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD CONSTRAINT reservations_refund_bounded
    CHECK (refunded BETWEEN 0 AND amount);

CREATE TABLE reservation_refunds (
    reference      text PRIMARY KEY,
    reservation_id uuid        NOT NULL REFERENCES reservations (reservation_id),
    amount         bigint      NOT NULL CHECK (amount > 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
