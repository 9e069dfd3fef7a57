-- Reserve's fast path and settlements, many to a statement and a commit
-- (group commit: services/common/group_commit.py). A hot budget's row lock is
-- then taken once per batch, not once per request, and the commit's WAL
-- flush is shared by every request in the batch.
--
-- Items are applied in order, each by the single-item function it would
-- have been applied by alone (reserve_if_plain, settle_reservation), so an
-- item sees what the items before it wrote: a batch never lets two
-- reservations share the same room in a budget.
--
-- Deadlocks: before any item runs, the batch locks every reservation it
-- settles (in id order), then every budget any item may touch (in id
-- order): the order in which settle_reservation and Refund lock them
-- (reservation, then its budgets), and in which Reserve's full path locks
-- budgets. Each item then only takes locks the batch holds already, or
-- waits on the unique index of a reference that another transaction, one
-- holding all of its locks already, is inserting.
--
-- A batch of one is cheaper as the single-item function's own statement,
-- and services/budget/store.py sends it so.
--
-- p_kind: 1 reserve (the reservation's columns and p_now), 2 settle
-- (p_reservation_id, p_to and p_now). One row per item, in order: for a
-- reserve, reserve_if_plain's outcome and budget_ids; for a settle,
-- settle_reservation's prior and settled.
CREATE FUNCTION reservation_batch(
    p_kind smallint[], p_reservation_id uuid[], p_reference text[], p_user_id uuid[],
    p_amount bigint[], p_currency text[], p_category text[], p_expires_at timestamptz[],
    p_to smallint[], p_now timestamptz[])
RETURNS TABLE (o_index int, o_outcome smallint, o_budget_ids uuid[], o_prior smallint,
               o_settled smallint)
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    -- Arrays, so that both locking statements are index scans (= ANY) for
    -- any batch size, whatever plan the function caches.
    v_settled uuid[] := ARRAY(
        SELECT u.id FROM unnest(p_kind, p_reservation_id) u(kind, id) WHERE u.kind = 2);
    v_users uuid[] := ARRAY(
        SELECT u.user_id FROM unnest(p_kind, p_user_id) u(kind, user_id) WHERE u.kind = 1);
BEGIN
    PERFORM 1 FROM reservations WHERE reservation_id = ANY (v_settled)
     ORDER BY reservation_id FOR UPDATE;
    -- Every active budget of a reserving user: a superset of those its
    -- reservation may charge, which costs nothing but an earlier lock.
    PERFORM 1 FROM budgets
     WHERE budget_id IN (
           SELECT l.budget_id FROM reservation_lines l WHERE l.reservation_id = ANY (v_settled)
           UNION ALL
           SELECT x.budget_id FROM budgets x WHERE x.user_id = ANY (v_users) AND x.status = 1)
     ORDER BY budget_id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_kind, 1), 0) LOOP
        o_index := i;
        o_outcome := NULL;
        o_budget_ids := NULL;
        o_prior := NULL;
        o_settled := NULL;
        IF p_kind[i] = 1 THEN
            SELECT r.outcome, r.budget_ids INTO o_outcome, o_budget_ids
              FROM reserve_if_plain(p_reservation_id[i], p_reference[i], p_user_id[i],
                                    p_amount[i], p_currency[i], p_category[i],
                                    p_expires_at[i], p_now[i]) r;
        ELSIF p_kind[i] = 2 THEN
            SELECT s.prior, s.settled INTO o_prior, o_settled
              FROM settle_reservation(p_reservation_id[i], p_to[i], p_now[i]) s;
        ELSE
            RAISE EXCEPTION 'a batch item is a reserve (1) or a settle (2), not %', p_kind[i];
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
