-- Every scoring decision (append-only, for audit and training) and the
-- block and allow lists.

CREATE TABLE decisions (
    transaction_id uuid PRIMARY KEY,
    user_id        uuid        NOT NULL,
    type           text        NOT NULL,
    amount         bigint      NOT NULL CHECK (amount > 0),
    currency       text        NOT NULL,
    score          double precision NOT NULL CHECK (score BETWEEN 0 AND 100),
    decision       smallint    NOT NULL CHECK (decision IN (1, 2, 3)),  -- allow, review, block
    reasons        jsonb       NOT NULL DEFAULT '[]'::jsonb,
    features       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    model_version  text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_user_idx ON decisions (user_id, created_at DESC);

CREATE FUNCTION decisions_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fraud decisions are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER decisions_append_only BEFORE UPDATE OR DELETE ON decisions
    FOR EACH ROW EXECUTE FUNCTION decisions_are_append_only();

CREATE TABLE list_entries (
    list         smallint    NOT NULL CHECK (list IN (1, 2)),          -- block, allow
    subject_type smallint    NOT NULL CHECK (subject_type BETWEEN 1 AND 4),  -- user, device, ip, country
    value        text        NOT NULL CHECK (length(value) BETWEEN 1 AND 200),
    reason       text        NOT NULL DEFAULT '',
    created_by   text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (list, subject_type, value)
);
