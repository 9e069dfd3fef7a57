-- Wallet PINs for step-up confirmation: a memory-hard hash (argon2id), never
-- the PIN; wrong tries counted towards a lockout.
CREATE TABLE wallet_pins (
    user_id      uuid PRIMARY KEY REFERENCES users (user_id),
    pin_hash     text        NOT NULL,
    failed_tries integer     NOT NULL DEFAULT 0 CHECK (failed_tries >= 0),
    locked_until timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
