-- Spend in another currency than a budget's: each line records the amount
-- counted on the budget (in the budget's currency) and the rate used, spend
-- currency to budget currency (NULL when they are the same). A line's refunds
-- are tracked on the line, in the budget's currency, so that giving spend back
-- never returns more to a budget than the line charged it.
ALTER TABLE reservation_lines ADD COLUMN rate numeric CHECK (rate > 0);
ALTER TABLE reservation_lines ADD COLUMN refunded bigint NOT NULL DEFAULT 0;
ALTER TABLE reservation_lines ADD CONSTRAINT reservation_lines_refund_bounded
    CHECK (refunded BETWEEN 0 AND amount);

-- Commit, release and expiry of a reservation in one statement, so that a
-- hot budget's row lock is held for no client round trip: the reservation is
-- locked, then its budgets in id order (as Reserve locks them: no deadlocks),
-- reserved spend moves to used (commit) or is freed (release, expiry).
-- prior is the status the reservation had (NULL: there is none), settled the
-- one it has now; the caller decides what a prior other than RESERVED means.
-- A RESERVED one whose ttl has passed is expired instead of settled as asked.
CREATE FUNCTION settle_reservation(
    p_reservation_id uuid, p_to smallint, p_now timestamptz,
    OUT prior smallint, OUT settled smallint)
LANGUAGE plpgsql AS $$
DECLARE
    v_expires timestamptz;
BEGIN
    IF p_to NOT IN (2, 3, 4) THEN
        RAISE EXCEPTION 'a reservation settles to committed, released or expired, not %', p_to;
    END IF;
    SELECT r.status, r.expires_at INTO prior, v_expires
      FROM reservations r WHERE r.reservation_id = p_reservation_id FOR UPDATE;
    settled := prior;
    IF NOT FOUND OR prior <> 1 THEN
        RETURN;
    END IF;
    settled := CASE WHEN v_expires <= p_now THEN 4 ELSE p_to END;
    PERFORM 1 FROM budgets WHERE budget_id IN
            (SELECT budget_id FROM reservation_lines WHERE reservation_id = p_reservation_id)
      ORDER BY budget_id FOR UPDATE;
    UPDATE budgets b
       SET reserved_amount = b.reserved_amount - l.amount,
           used_amount = CASE WHEN settled = 2 THEN b.used_amount + l.amount ELSE b.used_amount END,
           updated_at = p_now
      FROM reservation_lines l
     WHERE l.reservation_id = p_reservation_id AND b.budget_id = l.budget_id;
    UPDATE reservations r SET status = settled, updated_at = p_now
     WHERE r.reservation_id = p_reservation_id;
END $$;

-- Reserve's fast path, in one statement for the same reason: the budgets that
-- apply are locked in id order and, when the spend plainly fits all of them,
-- the reservation, its lines and the budgets' reserved amounts are written.
-- "Plainly" is conservative on purpose: a budget in another currency, a hard
-- budget the spend does not fit, or any alert threshold the spend would cross
-- returns outcome 0 and writes nothing, and the caller takes the full path
-- (services/budget/handlers.py), which decides those cases in the domain and
-- writes their alerts to the outbox in the same transaction. Outcome 1:
-- reserved (with the budgets charged); 2: the reference exists already.
CREATE FUNCTION reserve_if_plain(
    p_reservation_id uuid, p_reference text, p_user_id uuid, p_amount bigint,
    p_currency text, p_category text, p_expires_at timestamptz, p_now timestamptz,
    OUT outcome smallint, OUT budget_ids uuid[])
LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(array_agg(b.budget_id), '{}') INTO budget_ids FROM (
        SELECT budget_id FROM budgets
         WHERE user_id = p_user_id AND status = 1 AND category IN (p_category, 'ALL')
           AND start_date <= p_now AND end_date > p_now
         ORDER BY budget_id FOR UPDATE) b;
    IF EXISTS (
        SELECT 1 FROM budgets, LATERAL (SELECT used_amount::numeric + reserved_amount AS held) h
         WHERE budget_id = ANY (budget_ids)
           AND (currency <> p_currency
                -- hard: must fit; soft: must not go from within the total to beyond it
                OR (h.held + p_amount > total_amount AND (mode = 1 OR h.held <= total_amount))
                OR EXISTS (SELECT 1 FROM unnest(thresholds) t
                            WHERE (h.held + p_amount) * 100 >= t::numeric * total_amount
                              AND h.held * 100 < t::numeric * total_amount))
    ) THEN
        outcome := 0;
        budget_ids := NULL;
        RETURN;
    END IF;
    INSERT INTO reservations (reservation_id, reference, user_id, amount, currency, category,
                              status, expires_at)
    VALUES (p_reservation_id, p_reference, p_user_id, p_amount, p_currency, p_category, 1,
            p_expires_at)
    ON CONFLICT (reference) DO NOTHING;
    IF NOT FOUND THEN
        outcome := 2;
        budget_ids := NULL;
        RETURN;
    END IF;
    INSERT INTO reservation_lines (reservation_id, budget_id, amount)
    SELECT p_reservation_id, b, p_amount FROM unnest(budget_ids) b;
    UPDATE budgets SET reserved_amount = reserved_amount + p_amount, updated_at = p_now
     WHERE budget_id = ANY (budget_ids);
    outcome := 1;
END $$;
