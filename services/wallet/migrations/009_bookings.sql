-- Bookings the wallet paid, and the refunds of their cancellations.
CREATE TABLE bookings (
    booking_id     text PRIMARY KEY CHECK (length(booking_id) BETWEEN 1 AND 100),
    user_id        uuid        NOT NULL,
    wallet_id      uuid        REFERENCES wallets (wallet_id),
    amount         bigint      NOT NULL CHECK (amount > 0),
    currency       text        NOT NULL,
    category       text        NOT NULL,
    description    text        NOT NULL DEFAULT '',
    transfer_id    uuid        NOT NULL UNIQUE,
    reservation_id uuid,
    status         text        NOT NULL CHECK (status IN ('PROCESSING', 'CHARGED', 'FAILED')),
    failure_reason text,
    refunded       bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bookings_refund_bounded CHECK (refunded BETWEEN 0 AND amount),
    CHECK (status <> 'FAILED' OR failure_reason IS NOT NULL)
);

CREATE TABLE booking_refunds (
    refund_id  text PRIMARY KEY,
    booking_id text        NOT NULL REFERENCES bookings (booking_id),
    amount     bigint      NOT NULL CHECK (amount > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
