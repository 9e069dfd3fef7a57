-- Per-row foreign keys cost two index probes and two trigger calls for every
-- transfer; one statement-level check over the whole inserted batch enforces
-- the same thing (each account exists, in the transfer's currency) with one
-- join. Accounts are never deleted, so a reference can never dangle.
ALTER TABLE transfers DROP CONSTRAINT transfers_debit_account_currency_fkey;
ALTER TABLE transfers DROP CONSTRAINT transfers_credit_account_currency_fkey;

CREATE FUNCTION transfers_check_accounts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1
          FROM new_transfers n
          LEFT JOIN accounts d ON d.id = n.debit_account_id AND d.currency = n.currency
          LEFT JOIN accounts c ON c.id = n.credit_account_id AND c.currency = n.currency
         WHERE d.id IS NULL OR c.id IS NULL
    ) THEN
        RAISE EXCEPTION 'a transfer names an account that does not exist in its currency'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER transfers_accounts_exist AFTER INSERT ON transfers
    REFERENCING NEW TABLE AS new_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION transfers_check_accounts();

CREATE FUNCTION accounts_are_never_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'accounts are closed, never deleted (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_are_never_deleted();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION accounts_are_never_deleted();

-- Nothing reads transfers by time alone, nor entries by transfer: two
-- indexes fewer to maintain on every insert.
DROP INDEX transfers_created_idx;
DROP INDEX entries_transfer_idx;
