-- Reserve's fast path, Commit and Release as 006 batches them, with the
-- settled reservation returned by the statement that settles it, and with
-- the batch's up-front locks taken by primary key.

-- Commit, release and expiry as settle_reservation (004) does them, returning
-- the reservation as it is afterwards (its lines in budget id order), so the
-- caller need not read it again: the reservation and its lines are read
-- once, as they are locked. A reservation settled already is returned as it
-- is, unchanged and unlocked beyond its own row. prior NULL: there is none.
CREATE FUNCTION settle_reservation_returning(
    p_reservation_id uuid, p_to smallint, p_now timestamptz,
    OUT prior smallint, OUT settled smallint, OUT reference text, OUT user_id uuid,
    OUT amount bigint, OUT currency text, OUT category text, OUT expires_at timestamptz,
    OUT budget_ids uuid[], OUT line_amounts bigint[], OUT line_currencies text[],
    OUT line_rates numeric[])
LANGUAGE plpgsql AS $$
DECLARE
    v_line record;
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
    settled := prior;
    budget_ids := '{}';
    line_amounts := '{}';
    line_currencies := '{}';
    line_rates := '{}';
    IF prior <> 1 THEN
        SELECT coalesce(array_agg(l.budget_id ORDER BY l.budget_id), '{}'),
               coalesce(array_agg(l.amount ORDER BY l.budget_id), '{}'),
               coalesce(array_agg(b.currency ORDER BY l.budget_id), '{}'),
               coalesce(array_agg(l.rate ORDER BY l.budget_id), '{}')
          INTO budget_ids, line_amounts, line_currencies, line_rates
          FROM reservation_lines l JOIN budgets b ON b.budget_id = l.budget_id
         WHERE l.reservation_id = p_reservation_id;
        RETURN;
    END IF;
    settled := CASE WHEN expires_at <= p_now THEN 4 ELSE p_to END;
    -- Its budgets locked in id order, as every writer locks them.
    FOR v_line IN
        SELECT l.budget_id, l.amount, b.currency, l.rate
          FROM reservation_lines l JOIN budgets b ON b.budget_id = l.budget_id
         WHERE l.reservation_id = p_reservation_id
         ORDER BY l.budget_id FOR UPDATE OF b
    LOOP
        UPDATE budgets
           SET reserved_amount = reserved_amount - v_line.amount,
               used_amount = used_amount + CASE WHEN settled = 2 THEN v_line.amount ELSE 0 END,
               updated_at = p_now
         WHERE budget_id = v_line.budget_id;
        budget_ids := budget_ids || v_line.budget_id;
        line_amounts := line_amounts || v_line.amount;
        line_currencies := line_currencies || v_line.currency;
        line_rates := line_rates || v_line.rate;
    END LOOP;
    UPDATE reservations r SET status = settled, updated_at = p_now
     WHERE r.reservation_id = p_reservation_id;
END $$;

-- reservation_batch (006), returning each settled reservation as it is
-- afterwards (settle_reservation_returning's columns, o_ before each name),
-- so that the caller need not read it again. Before any item runs, the
-- batch locks every reservation it settles, then every budget any item may
-- touch, each in id order (006 says why); here one id at a time, by
-- equality on a primary key. 006 locked them with one statement over an
-- array of ids (= ANY) each: PL/pgSQL caches a generic plan per connection,
-- and one made while a table was small scans the whole table, and goes on
-- doing so as the table grows until something invalidates the plan (an
-- ANALYZE: never, with autovacuum off); its budgets statement was a
-- sequential scan of every budget in any case. Measured on 10,000 budgets:
-- 0.7-3 ms a batch, more than its items cost, and different from one pool
-- connection to the next. An equality lookup on a primary key is an index
-- scan for any table size, whatever plan is cached.
--
-- reservation_batch and settle_reservation stay, for replicas still
-- running the code that calls them during a deploy.
CREATE FUNCTION reservation_batch_returning(
    p_kind smallint[], p_reservation_id uuid[], p_reference text[], p_user_id uuid[],
    p_amount bigint[], p_currency text[], p_category text[], p_expires_at timestamptz[],
    p_to smallint[], p_now timestamptz[])
RETURNS TABLE (o_index int, o_outcome smallint, o_prior smallint, o_settled smallint,
               o_reference text, o_user_id uuid, o_amount bigint, o_currency text,
               o_category text, o_expires_at timestamptz, o_budget_ids uuid[],
               o_line_amounts bigint[], o_line_currencies text[], o_line_rates numeric[])
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    v_id uuid;
    v_budgets uuid[] := '{}';
BEGIN
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(p_kind, p_reservation_id) u(kind, id)
                 WHERE u.kind = 2 ORDER BY u.id LOOP
        PERFORM 1 FROM reservations WHERE reservation_id = v_id FOR UPDATE;
        v_budgets := v_budgets || ARRAY(
            SELECT l.budget_id FROM reservation_lines l WHERE l.reservation_id = v_id);
    END LOOP;
    -- Every active budget of a reserving user: a superset of those its
    -- reservation may charge, which costs nothing but an earlier lock.
    FOR v_id IN SELECT DISTINCT u.id FROM unnest(p_kind, p_user_id) u(kind, id)
                 WHERE u.kind = 1 LOOP
        v_budgets := v_budgets || ARRAY(
            SELECT x.budget_id FROM budgets x WHERE x.user_id = v_id AND x.status = 1);
    END LOOP;
    FOR v_id IN SELECT DISTINCT b FROM unnest(v_budgets) b ORDER BY b LOOP
        PERFORM 1 FROM budgets WHERE budget_id = v_id FOR UPDATE;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_kind, 1), 0) LOOP
        o_index := i;
        IF p_kind[i] = 1 THEN
            SELECT r.outcome, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, r.budget_ids,
                   NULL, NULL, NULL
              INTO o_outcome, o_prior, o_settled, o_reference, o_user_id, o_amount,
                   o_currency, o_category, o_expires_at, o_budget_ids, o_line_amounts,
                   o_line_currencies, o_line_rates
              FROM reserve_if_plain(p_reservation_id[i], p_reference[i], p_user_id[i],
                                    p_amount[i], p_currency[i], p_category[i],
                                    p_expires_at[i], p_now[i]) r;
        ELSIF p_kind[i] = 2 THEN
            SELECT NULL, s.*
              INTO o_outcome, o_prior, o_settled, o_reference, o_user_id, o_amount,
                   o_currency, o_category, o_expires_at, o_budget_ids, o_line_amounts,
                   o_line_currencies, o_line_rates
              FROM settle_reservation_returning(p_reservation_id[i], p_to[i], p_now[i]) s;
        ELSE
            RAISE EXCEPTION 'a batch item is a reserve (1) or a settle (2), not %', p_kind[i];
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
