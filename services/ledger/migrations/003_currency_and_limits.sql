-- A transfer's currency is its accounts' currency: enforced by the database,
-- not only by the engine. The composite keys replace the plain ones.
ALTER TABLE accounts ADD CONSTRAINT accounts_id_currency_key UNIQUE (id, currency);
ALTER TABLE transfers DROP CONSTRAINT transfers_debit_account_id_fkey;
ALTER TABLE transfers DROP CONSTRAINT transfers_credit_account_id_fkey;
ALTER TABLE transfers ADD CONSTRAINT transfers_debit_account_currency_fkey
    FOREIGN KEY (debit_account_id, currency) REFERENCES accounts (id, currency);
ALTER TABLE transfers ADD CONSTRAINT transfers_credit_account_currency_fkey
    FOREIGN KEY (credit_account_id, currency) REFERENCES accounts (id, currency);

-- The overdraft check sums in numeric, so that no limit, however large, can
-- overflow bigint and make an account impossible to credit.
ALTER TABLE accounts DROP CONSTRAINT accounts_no_overdraft;
ALTER TABLE accounts ADD CONSTRAINT accounts_no_overdraft CHECK (
    NOT no_overdraft
    OR debits_posted::numeric + debits_pending <= credits_posted::numeric + overdraft_limit
);
