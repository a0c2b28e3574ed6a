"""Credit leases: Authorize decides in one statement in metering's database.

`credit_leases` is metering's side of an org's credit lease in the ledger (one row per org,
shared by every replica). What requests may still hold is

    free = granted - returned - charged - held

where granted and returned are the ledger's figures as last seen (granted counts usage the
lease's hold did not pay as granted back, see services/ledger/leases.py), charged is the cost
of usage recorded here against the lease (before the ledger is told: so the ledger's hold is
never smaller than what is admitted against it) and held is what open authorizations hold.

`authorize_holds` decides a group of Authorize calls of one org in one statement: per call,
the replay check by request id, each budget (spent + reserved + estimate <= the call's cap for
a plain ALLOW), the lease (free >= estimate), then the authorization with its holds. A call
whose budget or lease does not fit is left undecided (its holds given back inside the
statement) and decided by the locking path in Python; the answer of a HELD call is stored as
columns (no JSON on the hot path).

Revision ID: 0004_leases
Revises: 0004_ingest
"""

from alembic import op

from tally.kit.db import run_script

revision = "0004_leases"
down_revision = "0004_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE metering.credit_leases (
            org_id          text PRIMARY KEY,
            lease_id        text NOT NULL,
            epoch           integer NOT NULL,
            granted_micros  bigint NOT NULL DEFAULT 0,
            returned_micros bigint NOT NULL DEFAULT 0,
            charged_micros  bigint NOT NULL DEFAULT 0,
            held_micros     bigint NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
            billing_state   text NOT NULL DEFAULT 'ACTIVE',
            expires_at      timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL DEFAULT now()
        );

        -- Where the ledger's outbox stream was followed to (one row).
        CREATE TABLE metering.ledger_cursor (
            id       boolean PRIMARY KEY DEFAULT true CHECK (id),
            sequence bigint NOT NULL
        );

        ALTER TABLE metering.authorizations
            ADD COLUMN lease_held_micros bigint NOT NULL DEFAULT 0,
            ADD COLUMN model text,
            ADD COLUMN price_book_version bigint,
            ADD COLUMN headroom_scopes text[],
            ADD COLUMN headroom_units text[],
            ADD COLUMN headroom_limits bigint[],
            ADD COLUMN headroom_remaining bigint[],
            ALTER COLUMN response DROP NOT NULL;

        -- The outbox sealer waits for this instead of polling (kit.background.run_when_notified).
        CREATE FUNCTION metering.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            PERFORM pg_notify('metering_outbox', '');
            RETURN NULL;
        END
        $fn$;
        CREATE TRIGGER outbox_notify AFTER INSERT ON metering.outbox
            FOR EACH STATEMENT EXECUTE FUNCTION metering.outbox_notify();

        -- One call per Authorize group. Calls are 1..n; b_* and h_* are flattened per call
        -- (b_call / h_call say whose). Returns one row per call: HELD (with the lease's free
        -- credit, the org's billing state and each budget's remaining room after), REPLAY
        -- (the request id is recorded), BUDGET or LEASE (nothing written: decide elsewhere).
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
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION metering.authorize_holds")
    op.execute("DROP TRIGGER outbox_notify ON metering.outbox")
    op.execute("DROP FUNCTION metering.outbox_notify")
    op.execute("ALTER TABLE metering.authorizations DROP COLUMN lease_held_micros, "
               "DROP COLUMN model, DROP COLUMN price_book_version, DROP COLUMN headroom_scopes, "
               "DROP COLUMN headroom_units, DROP COLUMN headroom_limits, "
               "DROP COLUMN headroom_remaining")
    op.execute("DROP TABLE metering.ledger_cursor, metering.credit_leases")
