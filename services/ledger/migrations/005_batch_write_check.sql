-- A batch's write checks in the same statement that every row its
-- decisions rest on is still as it read it (services/ledger/store.py,
-- write_batch): it counts the rows it found unchanged, and the accounts it
-- updated, and calls this, which refuses the whole statement when any count
-- is short, so that nothing of the batch is written. A pipelined batch reads
-- without locks, so this is what keeps it from writing balances computed
-- from a state that is gone.
CREATE FUNCTION ledger_batch_unchanged(
    transfers_expected bigint, transfers_found bigint,
    accounts_expected bigint, accounts_found bigint,
    updates_expected bigint, updates_done bigint
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF transfers_found <> transfers_expected OR accounts_found <> accounts_expected
       OR updates_done <> updates_expected THEN
        RAISE EXCEPTION 'a batch''s accounts or transfers changed since it read them'
            USING ERRCODE = 'serialization_failure',
                  DETAIL = format('transfers unchanged %s of %s, accounts unchanged %s of %s,'
                                  ' accounts updated %s of %s',
                                  transfers_found, transfers_expected,
                                  accounts_found, accounts_expected,
                                  updates_done, updates_expected);
    END IF;
    RETURN true;
END $$;
