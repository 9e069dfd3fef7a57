-- settle_reservation_returning (007) read a reservation's lines joined to
-- their budgets, with the budgets locked by that join: a join whose plan,
-- cached while the tables were small, scans every budget, and keeps doing so
-- as they grow (seen in tests/integration/test_budget_group_commit.py: one
-- sequential scan a settle). Now each line's budget is read, and locked by
-- its own update, by its key, in budget id order as before.
CREATE OR REPLACE FUNCTION settle_reservation_returning(
    p_reservation_id uuid, p_to smallint, p_now timestamptz,
    OUT prior smallint, OUT settled smallint, OUT reference text, OUT user_id uuid,
    OUT amount bigint, OUT currency text, OUT category text, OUT expires_at timestamptz,
    OUT budget_ids uuid[], OUT line_amounts bigint[], OUT line_currencies text[],
    OUT line_rates numeric[])
LANGUAGE plpgsql AS $$
DECLARE
    v_line record;
    v_currency text;
BEGIN
    IF p_to NOT IN (2, 3, 4) THEN
        RAISE EXCEPTION 'a reservation settles to committed, released or expired, not %', p_to;
    END IF;
    SELECT r.status, r.reference, r.user_id, r.amount, r.currency, r.category, r.expires_at
      INTO prior, reference, user_id, amount, currency, category, expires_at
      FROM reservations r WHERE r.reservation_id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    settled := CASE WHEN prior <> 1 THEN prior WHEN expires_at <= p_now THEN 4 ELSE p_to END;
    budget_ids := '{}';
    line_amounts := '{}';
    line_currencies := '{}';
    line_rates := '{}';
    -- Line by line in budget id order, each budget by its key (locked by its
    -- update, in id order, as every writer locks them): no join a plan
    -- cached while the tables were small could make a scan of every budget.
    FOR v_line IN
        SELECT l.budget_id, l.amount, l.rate FROM reservation_lines l
         WHERE l.reservation_id = p_reservation_id ORDER BY l.budget_id
    LOOP
        IF prior = 1 THEN
            UPDATE budgets b
               SET reserved_amount = b.reserved_amount - v_line.amount,
                   used_amount = b.used_amount
                                 + CASE WHEN settled = 2 THEN v_line.amount ELSE 0 END,
                   updated_at = p_now
             WHERE b.budget_id = v_line.budget_id
            RETURNING b.currency INTO v_currency;
        ELSE
            SELECT b.currency INTO v_currency FROM budgets b WHERE b.budget_id = v_line.budget_id;
        END IF;
        budget_ids := budget_ids || v_line.budget_id;
        line_amounts := line_amounts || v_line.amount;
        line_currencies := line_currencies || v_currency;
        line_rates := line_rates || v_line.rate;
    END LOOP;
    IF prior = 1 THEN
        UPDATE reservations r SET status = settled, updated_at = p_now
         WHERE r.reservation_id = p_reservation_id;
    END IF;
END $$;
