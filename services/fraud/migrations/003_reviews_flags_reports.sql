-- What a decision was made from, the review queue, flagged recipients, fraud
-- reported after the fact, and a version counter for the lists every replica
-- caches.

-- The transaction as scored, for audit and for training. Rows scored before
-- this migration keep the defaults.
ALTER TABLE decisions
    ADD COLUMN recipient_kind smallint    NOT NULL DEFAULT 0 CHECK (recipient_kind BETWEEN 0 AND 3),
    ADD COLUMN recipient_id   text        NOT NULL DEFAULT '' CHECK (length(recipient_id) <= 200),
    ADD COLUMN device_id      text        NOT NULL DEFAULT '' CHECK (length(device_id) <= 200),
    ADD COLUMN ip             text        NOT NULL DEFAULT '' CHECK (length(ip) <= 64),
    ADD COLUMN country        text        NOT NULL DEFAULT '' CHECK (country ~ '^([A-Z]{2})?$'),
    ADD COLUMN latitude       double precision CHECK (latitude BETWEEN -90 AND 90),
    ADD COLUMN longitude      double precision CHECK (longitude BETWEEN -180 AND 180),
    ADD COLUMN occurred_at    timestamptz,
    -- Redis was unavailable: the rules that need it were not evaluated.
    ADD COLUMN degraded       boolean     NOT NULL DEFAULT false,
    ADD CONSTRAINT decisions_location_whole CHECK ((latitude IS NULL) = (longitude IS NULL));

-- Every REVIEW decision opens one case. A case goes from OPEN (or EXPIRED:
-- nobody resolved it in time) to APPROVED or REJECTED once; nothing else
-- about it ever changes, and it is never deleted.
CREATE TABLE reviews (
    review_id      uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    transaction_id uuid        NOT NULL UNIQUE REFERENCES decisions (transaction_id),
    status         smallint    NOT NULL DEFAULT 1 CHECK (status BETWEEN 1 AND 4),  -- open, approved, rejected, expired
    marked_fraud   boolean     NOT NULL DEFAULT false,
    resolved_by    text        NOT NULL DEFAULT '' CHECK (length(resolved_by) <= 200),
    created_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    CHECK ((status IN (2, 3)) = (resolved_at IS NOT NULL)),
    CHECK (NOT marked_fraud OR status = 3)
);
CREATE INDEX reviews_queue_idx ON reviews (status, created_at, review_id);
CREATE INDEX reviews_created_idx ON reviews (created_at, review_id);

CREATE FUNCTION reviews_resolve_once() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'review cases are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.review_id, NEW.transaction_id, NEW.created_at)
           IS DISTINCT FROM (OLD.review_id, OLD.transaction_id, OLD.created_at)
       OR OLD.status NOT IN (1, 4)
       OR NOT (NEW.status IN (2, 3) OR (OLD.status = 1 AND NEW.status = 4)) THEN
        RAISE EXCEPTION 'a review case is resolved once (% to % refused)', OLD.status, NEW.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reviews_resolve_once BEFORE UPDATE OR DELETE ON reviews
    FOR EACH ROW EXECUTE FUNCTION reviews_resolve_once();

-- Fraud found after the decision (chargebacks, customers' reports): labels.
CREATE TABLE fraud_reports (
    transaction_id uuid        PRIMARY KEY REFERENCES decisions (transaction_id),
    reason         text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    reported_by    text        NOT NULL DEFAULT '' CHECK (length(reported_by) <= 200),
    reported_at    timestamptz NOT NULL DEFAULT now()
);

-- Recipients flagged as suspect (mule accounts), and the audit of every
-- flag and unflag.
CREATE TABLE flagged_accounts (
    account_id uuid        PRIMARY KEY,
    reason     text        NOT NULL DEFAULT '' CHECK (length(reason) <= 500),
    flagged_by text        NOT NULL DEFAULT '' CHECK (length(flagged_by) <= 200),
    flagged_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE account_flag_history (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id uuid        NOT NULL,
    action     text        NOT NULL CHECK (action IN ('FLAG', 'UNFLAG')),
    reason     text        NOT NULL DEFAULT '',
    actor      text        NOT NULL DEFAULT '',
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER account_flag_history_append_only BEFORE UPDATE OR DELETE ON account_flag_history
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER fraud_reports_append_only BEFORE UPDATE OR DELETE ON fraud_reports
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- Every replica keeps the block and allow lists and the flagged accounts in
-- memory; a change bumps this counter, which replicas poll.
CREATE TABLE lists_version (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version  bigint  NOT NULL
);
INSERT INTO lists_version VALUES (true, 1);

CREATE FUNCTION lists_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lists_version SET version = version + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER list_entries_changed AFTER INSERT OR UPDATE OR DELETE ON list_entries
    FOR EACH STATEMENT EXECUTE FUNCTION lists_changed();
CREATE TRIGGER flagged_accounts_changed AFTER INSERT OR UPDATE OR DELETE ON flagged_accounts
    FOR EACH STATEMENT EXECUTE FUNCTION lists_changed();
