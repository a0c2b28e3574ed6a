"""The balance headroom of Authorize is what the org can spend, not the lease's free credit.

`credit_leases.ledger_available_micros` is the org's available credit in the ledger beyond
its leases, as the ledger last told metering: each ExtendLease answer (every top-up and
renewal) sets it, and a lease the ledger shrank itself (a refund, grant expiry, adjustment:
it only does so once the org's available credit is used up) sets it to 0. The "balance"
headroom of an answer is then

    remaining = lease free after the hold + ledger_available_micros,  limit = remaining + hold

(credit bought since the ledger's last answer is not counted until the next one).
`authorize_holds` returns it per HELD call as `ledger_available`.

Revision ID: 0006_authz_balance
Revises: 0004_leases
"""


from tally.kit.db import run_script

revision = "0006_authz_balance"
down_revision = "0004_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        ALTER TABLE metering.credit_leases
            ADD COLUMN ledger_available_micros bigint NOT NULL DEFAULT 0;

        DROP FUNCTION metering.authorize_holds;
        CREATE FUNCTION metering.authorize_holds(
            c_org text[], c_request text[], c_hash text[], c_model text[],
            c_reservation text[], c_cost bigint[], c_version bigint[],
            c_expires timestamptz[],
            b_call int[], b_budget text[], b_start timestamptz[], b_cap bigint[],
            b_limit bigint[],
            h_call int[], h_scope text[], h_unit text[], h_limit bigint[], h_remaining bigint[],
            p_now timestamptz)
        RETURNS TABLE (idx int, outcome text, lease_free bigint, billing_state text,
                       budget_left bigint[], ledger_available bigint)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            i int;
            j int;
            cost bigint;
            left_after bigint;
            free bigint;
            avail bigint;
            state text;
            placed int[];
            holds jsonb;
            scopes text[];
            units text[];
            limits bigint[];
            remaining bigint[];
            n int := coalesce(array_length(c_org, 1), 0);
            nb int := coalesce(array_length(b_call, 1), 0);
            nh int := coalesce(array_length(h_call, 1), 0);
        BEGIN
            -- every row the group may touch, locked in the one global order (budgets by
            -- key, then leases by org), as ingestion and the locking path take them
            PERFORM 1 FROM metering.budget_usage u
              JOIN unnest(b_budget, b_start) AS k(id, start)
                ON u.budget_id = k.id AND u.period_start = k.start
             ORDER BY u.budget_id, u.period_start FOR UPDATE OF u;
            PERFORM 1 FROM metering.credit_leases l
             WHERE l.org_id = ANY(c_org) ORDER BY l.org_id FOR UPDATE;
            FOR i IN 1..n LOOP
                idx := i;
                cost := c_cost[i];
                free := NULL;
                avail := NULL;
                ledger_available := NULL;
                state := NULL;
                IF EXISTS (SELECT 1 FROM metering.authorizations a
                            WHERE a.org_id = c_org[i] AND a.request_id = c_request[i]) THEN
                    outcome := 'REPLAY'; lease_free := NULL; billing_state := NULL;
                    budget_left := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                placed := '{}';
                budget_left := '{}';
                holds := '[]';
                scopes := '{}'; units := '{}'; limits := '{}'; remaining := '{}';
                FOR j IN 1..nh LOOP
                    IF h_call[j] = i THEN
                        scopes := scopes || h_scope[j]; units := units || h_unit[j];
                        limits := limits || h_limit[j]; remaining := remaining || h_remaining[j];
                    END IF;
                END LOOP;
                outcome := 'HELD';
                FOR j IN 1..nb LOOP
                    CONTINUE WHEN b_call[j] <> i;
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros + cost
                     WHERE u.budget_id = b_budget[j] AND u.period_start = b_start[j]
                       AND u.spent_micros + u.reserved_micros + cost <= b_cap[j]
                    RETURNING b_limit[j] - u.spent_micros - u.reserved_micros INTO left_after;
                    IF NOT FOUND THEN
                        outcome := 'BUDGET';
                        EXIT;
                    END IF;
                    placed := placed || j;
                    IF cost > 0 THEN
                        holds := holds || jsonb_build_array(jsonb_build_array(
                            b_budget[j], b_start[j], cost));
                    END IF;
                    scopes := scopes || ('budget:' || b_budget[j]);
                    units := units || 'micros'::text;
                    limits := limits || b_limit[j]; remaining := remaining || left_after;
                    budget_left := budget_left || left_after;
                END LOOP;
                IF outcome = 'HELD' AND cost > 0 THEN
                    UPDATE metering.credit_leases l SET held_micros = l.held_micros + cost
                     WHERE l.org_id = c_org[i] AND l.billing_state <> 'READ_ONLY'
                       AND l.expires_at > p_now
                       AND l.granted_micros - l.returned_micros - l.charged_micros
                           - l.held_micros >= cost
                    RETURNING l.granted_micros - l.returned_micros - l.charged_micros
                              - l.held_micros, l.billing_state, l.ledger_available_micros
                         INTO free, state, avail;
                    IF NOT FOUND THEN
                        outcome := 'LEASE';
                    ELSE
                        scopes := scopes || 'balance'::text; units := units || 'micros'::text;
                        limits := limits || (free + avail + cost);
                        remaining := remaining || (free + avail);
                    END IF;
                END IF;
                IF outcome <> 'HELD' THEN
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros - cost
                      FROM unnest(placed) AS p(k)
                     WHERE u.budget_id = b_budget[p.k] AND u.period_start = b_start[p.k];
                    lease_free := NULL; billing_state := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                INSERT INTO metering.authorizations (org_id, request_id, request_hash,
                    decision, reservation_id, reserved_micros, budget_holds, state, expires_at,
                    response, lease_held_micros, model, price_book_version, headroom_scopes,
                    headroom_units, headroom_limits, headroom_remaining)
                VALUES (c_org[i], c_request[i], c_hash[i], 'ALLOW', c_reservation[i], cost,
                    holds, 'HELD', c_expires[i], NULL, cost, c_model[i], c_version[i], scopes,
                    units, limits, remaining)
                ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN  -- recorded meanwhile by a call that did not hold the lease
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros - cost
                      FROM unnest(placed) AS p(k)
                     WHERE u.budget_id = b_budget[p.k] AND u.period_start = b_start[p.k];
                    IF free IS NOT NULL THEN
                        UPDATE metering.credit_leases l SET held_micros = l.held_micros - cost
                         WHERE l.org_id = c_org[i];
                    END IF;
                    outcome := 'REPLAY'; lease_free := NULL; billing_state := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                lease_free := free;
                ledger_available := avail;
                billing_state := coalesce(state, 'ACTIVE');
                RETURN NEXT;
            END LOOP;
        END
        $fn$;
        """
    )


def downgrade() -> None:
    run_script(
        """
        DROP FUNCTION metering.authorize_holds;
        CREATE FUNCTION metering.authorize_holds(
            c_org text[], c_request text[], c_hash text[], c_model text[],
            c_reservation text[], c_cost bigint[], c_version bigint[],
            c_expires timestamptz[],
            b_call int[], b_budget text[], b_start timestamptz[], b_cap bigint[],
            b_limit bigint[],
            h_call int[], h_scope text[], h_unit text[], h_limit bigint[], h_remaining bigint[],
            p_now timestamptz)
        RETURNS TABLE (idx int, outcome text, lease_free bigint, billing_state text,
                       budget_left bigint[])
        LANGUAGE plpgsql AS $fn$
        DECLARE
            i int;
            j int;
            cost bigint;
            left_after bigint;
            free bigint;
            state text;
            placed int[];
            holds jsonb;
            scopes text[];
            units text[];
            limits bigint[];
            remaining bigint[];
            n int := coalesce(array_length(c_org, 1), 0);
            nb int := coalesce(array_length(b_call, 1), 0);
            nh int := coalesce(array_length(h_call, 1), 0);
        BEGIN
            -- every row the group may touch, locked in the one global order (budgets by
            -- key, then leases by org), as ingestion and the locking path take them
            PERFORM 1 FROM metering.budget_usage u
              JOIN unnest(b_budget, b_start) AS k(id, start)
                ON u.budget_id = k.id AND u.period_start = k.start
             ORDER BY u.budget_id, u.period_start FOR UPDATE OF u;
            PERFORM 1 FROM metering.credit_leases l
             WHERE l.org_id = ANY(c_org) ORDER BY l.org_id FOR UPDATE;
            FOR i IN 1..n LOOP
                idx := i;
                cost := c_cost[i];
                free := NULL;
                state := NULL;
                IF EXISTS (SELECT 1 FROM metering.authorizations a
                            WHERE a.org_id = c_org[i] AND a.request_id = c_request[i]) THEN
                    outcome := 'REPLAY'; lease_free := NULL; billing_state := NULL;
                    budget_left := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                placed := '{}';
                budget_left := '{}';
                holds := '[]';
                scopes := '{}'; units := '{}'; limits := '{}'; remaining := '{}';
                FOR j IN 1..nh LOOP
                    IF h_call[j] = i THEN
                        scopes := scopes || h_scope[j]; units := units || h_unit[j];
                        limits := limits || h_limit[j]; remaining := remaining || h_remaining[j];
                    END IF;
                END LOOP;
                outcome := 'HELD';
                FOR j IN 1..nb LOOP
                    CONTINUE WHEN b_call[j] <> i;
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros + cost
                     WHERE u.budget_id = b_budget[j] AND u.period_start = b_start[j]
                       AND u.spent_micros + u.reserved_micros + cost <= b_cap[j]
                    RETURNING b_limit[j] - u.spent_micros - u.reserved_micros INTO left_after;
                    IF NOT FOUND THEN
                        outcome := 'BUDGET';
                        EXIT;
                    END IF;
                    placed := placed || j;
                    IF cost > 0 THEN
                        holds := holds || jsonb_build_array(jsonb_build_array(
                            b_budget[j], b_start[j], cost));
                    END IF;
                    scopes := scopes || ('budget:' || b_budget[j]);
                    units := units || 'micros'::text;
                    limits := limits || b_limit[j]; remaining := remaining || left_after;
                    budget_left := budget_left || left_after;
                END LOOP;
                IF outcome = 'HELD' AND cost > 0 THEN
                    UPDATE metering.credit_leases l SET held_micros = l.held_micros + cost
                     WHERE l.org_id = c_org[i] AND l.billing_state <> 'READ_ONLY'
                       AND l.expires_at > p_now
                       AND l.granted_micros - l.returned_micros - l.charged_micros
                           - l.held_micros >= cost
                    RETURNING l.granted_micros - l.returned_micros - l.charged_micros
                              - l.held_micros, l.billing_state INTO free, state;
                    IF NOT FOUND THEN
                        outcome := 'LEASE';
                    ELSE
                        scopes := scopes || 'balance'::text; units := units || 'micros'::text;
                        limits := limits || (free + cost); remaining := remaining || free;
                    END IF;
                END IF;
                IF outcome <> 'HELD' THEN
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros - cost
                      FROM unnest(placed) AS p(k)
                     WHERE u.budget_id = b_budget[p.k] AND u.period_start = b_start[p.k];
                    lease_free := NULL; billing_state := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                INSERT INTO metering.authorizations (org_id, request_id, request_hash,
                    decision, reservation_id, reserved_micros, budget_holds, state, expires_at,
                    response, lease_held_micros, model, price_book_version, headroom_scopes,
                    headroom_units, headroom_limits, headroom_remaining)
                VALUES (c_org[i], c_request[i], c_hash[i], 'ALLOW', c_reservation[i], cost,
                    holds, 'HELD', c_expires[i], NULL, cost, c_model[i], c_version[i], scopes,
                    units, limits, remaining)
                ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN  -- recorded meanwhile by a call that did not hold the lease
                    UPDATE metering.budget_usage u SET reserved_micros = u.reserved_micros - cost
                      FROM unnest(placed) AS p(k)
                     WHERE u.budget_id = b_budget[p.k] AND u.period_start = b_start[p.k];
                    IF free IS NOT NULL THEN
                        UPDATE metering.credit_leases l SET held_micros = l.held_micros - cost
                         WHERE l.org_id = c_org[i];
                    END IF;
                    outcome := 'REPLAY'; lease_free := NULL; billing_state := NULL;
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                lease_free := free;
                billing_state := coalesce(state, 'ACTIVE');
                RETURN NEXT;
            END LOOP;
        END
        $fn$;
        ALTER TABLE metering.credit_leases DROP COLUMN ledger_available_micros;
        """
    )
