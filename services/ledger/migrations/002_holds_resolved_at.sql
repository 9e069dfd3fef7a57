-- When a hold was posted, voided or expired: balances as of a past moment
-- count a hold only while it was open.
ALTER TABLE transfers ADD COLUMN resolved_at timestamptz;
ALTER TABLE transfers ADD CONSTRAINT transfers_resolved_only_holds
    CHECK (resolved_at IS NULL OR (type = 2 AND status IN (3, 4, 5)));
-- Holds are resolved once: a resolved hold never reopens.
CREATE FUNCTION transfers_guard_updates() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.debit_account_id, NEW.credit_account_id, NEW.amount, NEW.currency, NEW.type,
        NEW.pending_id, NEW.reverses_id, NEW.linked, NEW.timeout_seconds, NEW.code, NEW.metadata,
        NEW.effective_at, NEW.created_at, NEW.expires_at)
       IS DISTINCT FROM
       (OLD.id, OLD.debit_account_id, OLD.credit_account_id, OLD.amount, OLD.currency, OLD.type,
        OLD.pending_id, OLD.reverses_id, OLD.linked, OLD.timeout_seconds, OLD.code, OLD.metadata,
        OLD.effective_at, OLD.created_at, OLD.expires_at) THEN
        RAISE EXCEPTION 'a transfer is immutable but for its status and amount reversed'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status <> NEW.status AND OLD.status <> 2 THEN
        RAISE EXCEPTION 'only an open hold changes status' USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.amount_reversed < OLD.amount_reversed THEN
        RAISE EXCEPTION 'the amount reversed never decreases' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER transfers_guard_updates BEFORE UPDATE ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_guard_updates();

CREATE FUNCTION transfers_are_never_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'transfers are never deleted (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER transfers_no_delete BEFORE DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_are_never_deleted();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION transfers_are_never_deleted();

CREATE INDEX transfers_created_idx ON transfers (created_at DESC, id DESC);

ALTER TABLE accounts ADD COLUMN closed_reason text;
