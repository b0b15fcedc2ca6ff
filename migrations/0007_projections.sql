-- Kurier CQRS projections: read models built from kurier.events, each event
-- applied exactly once (guarantee 10): the read-model writes of a batch and
-- the move of the projection's checkpoint commit in one transaction, the move
-- being a compare-and-set on the old position; a failing event stops its
-- projection visibly (failed, then parked) and is never skipped silently.
--
-- Two kinds of projection share the bookkeeping in kurier.projections:
--   * SQL projections (kurier.define_projection): the handler is an SQL or
--     PL/pgSQL function taking one kurier.event; the daemon calls
--     kurier.run_projection(name, max_count) in a transaction and commits.
--   * Projections run by application code (kurier.register_projection,
--     handler NULL), e.g. Rust: the application reads kurier.read_all itself,
--     applies the events and calls kurier.projection_checkpoint(name, old,
--     new) in the same transaction (NOTES.md, "the SQL loop").
-- Operators: kurier.pause_projection, resume_projection,
-- skip_projection_event, rebuild_projection, drop_projection,
-- kurier.projection_status(), kurier.projection_caught_up(name); every such
-- action is recorded in kurier.projection_events.
--
-- Written against schema kurier; other schemas get this text with every
-- "kurier." replaced, so every object, and every object named in generated
-- code, is schema-qualified and nothing relies on search_path. Messages start
-- "kurier: " (a colon) so that the rewrite leaves them alone.
--
-- Error codes (SQLSTATE):
--   22023  invalid argument (the message names it and the problem)
--   KU404  the projection does not exist
--   KU409  conflict with the projection's state: the checkpoint was moved by
--          another runner or by a rebuild; an operator action that does not
--          apply to the current status; a redefinition of a running projection
--
-- Needs 0005_event_store.sql (kurier.events, kurier.event, kurier.read_all).

-- A projection's name is a plain identifier because it is part of the name of
-- the function generated for it (kurier._projection_<name>): 12 + 50 bytes
-- stays under PostgreSQL's 63-byte identifier limit, so two names can never
-- be truncated to the same function name.
CREATE FUNCTION kurier._projection_valid_name(name text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$ SELECT $1 ~ '^[a-z_][a-z0-9_]{0,49}$' $fn$;

CREATE TABLE kurier.projections (
    name               text        PRIMARY KEY,
    -- The checkpoint: every event with global_position <= position has been
    -- applied (or skipped by an operator, see projection_events). A global
    -- position, also for projections of some categories only: it moves over
    -- the events of other categories too.
    position           bigint      NOT NULL DEFAULT 0,
    status             text        NOT NULL DEFAULT 'running',
    -- The handler's signature, schema-qualified, e.g. app.orders_apply(kurier.event);
    -- NULL for projections run by application code. Text, not regprocedure:
    -- pg_upgrade refuses databases with regprocedure columns in user tables
    -- (function OIDs are not preserved), and the generated function binds the
    -- handler by this name anyway (kurier.projection_status shows it as
    -- regprocedure).
    handler            text,
    -- Optional function without arguments that empties the read model;
    -- kurier.rebuild_projection calls it. Signature text, as handler.
    reset              text,
    -- Sorted, without duplicates; NULL = every category.
    categories         text[],
    -- The last failure: message, and (last_error_detail) SQLSTATE, detail,
    -- hint, context and the failed event's id, stream and type.
    last_error         text,
    last_error_detail  jsonb,
    -- The event that failed; always the first event of the projection's
    -- categories after position (the checkpoint stops right before it).
    failed_position    bigint,
    failed_attempts    integer     NOT NULL DEFAULT 0,
    -- Not run before this time (the backoff after a failure).
    retry_at           timestamptz,
    -- Backoff after the n-th failure of one event: retry_base_ms * 2^(n-1),
    -- at most retry_max_ms; after max_attempts failures the projection is parked.
    retry_base_ms      integer     NOT NULL DEFAULT 1000,
    retry_max_ms       integer     NOT NULL DEFAULT 60000,
    max_attempts       integer     NOT NULL DEFAULT 5,
    -- Handler calls since definition or the last rebuild (SQL projections only).
    events_applied     bigint      NOT NULL DEFAULT 0,
    -- Bumped when the handler, reset function or categories change.
    definition_version integer     NOT NULL DEFAULT 1,
    -- Set by rebuild_projection, cleared when the rebuild has caught up: a
    -- paused or parked rebuild resumes as 'rebuilding'.
    rebuild_started_at timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projections_name CHECK (kurier._projection_valid_name(name)),
    CONSTRAINT projections_position CHECK (position >= 0),
    CONSTRAINT projections_status CHECK (status IN ('running', 'paused', 'parked', 'rebuilding')),
    CONSTRAINT projections_categories CHECK (categories IS NULL
        OR (cardinality(categories) > 0 AND array_position(categories, NULL) IS NULL)),
    CONSTRAINT projections_retry CHECK (retry_base_ms > 0 AND retry_max_ms >= retry_base_ms AND max_attempts >= 1)
);
-- One row per projection, updated by every batch: fillfactor keeps the
-- updates HOT (only the primary key is indexed), and the dead versions are
-- vacuumed after a fixed count, as for the other queue-like tables.
ALTER TABLE kurier.projections SET (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- History: definitions, failures and every operator action. No foreign key:
-- the history of a dropped projection stays. Error texts recorded here come
-- from handlers and may quote read-model values.
CREATE TABLE kurier.projection_events (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name     text        NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind     text        NOT NULL,
    -- The projection's checkpoint (for failed/parked/skipped: the event's position).
    position bigint,
    detail   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Who did it (session_user) and from where (application_name).
    actor    text        NOT NULL DEFAULT session_user,
    application_name text DEFAULT current_setting('application_name', true),
    CONSTRAINT projection_events_kind CHECK (kind IN (
        'defined', 'redefined', 'failed', 'parked', 'resumed', 'skipped',
        'rebuild', 'reset', 'paused', 'caught_up', 'dropped'))
);
CREATE INDEX projection_events_name ON kurier.projection_events (name, id);

CREATE FUNCTION kurier._projection_log(p_name text, p_kind text, p_position bigint, p_detail jsonb)
    RETURNS void LANGUAGE sql
    AS $fn$ INSERT INTO kurier.projection_events (name, kind, position, detail)
            VALUES (p_name, p_kind, p_position, coalesce(p_detail, '{}'::jsonb)) $fn$;

-- Whether a committed (or the caller's own) event of these categories (NULL:
-- any) lies after pos. max() rather than EXISTS (... > pos): max() is one
-- step at the end of the primary key, or of the (category, global_position)
-- index per category, whatever pos is; an EXISTS planned without knowing pos
-- may scan the table from its start up to pos (1.4 ms at 45,000 events).
CREATE FUNCTION kurier._projection_events_after(pos bigint, categories text[]) RETURNS boolean
    LANGUAGE sql STABLE
    AS $fn$
    SELECT CASE WHEN $2 IS NULL
                THEN coalesce((SELECT max(e.global_position) FROM kurier.events e), 0) > $1
                ELSE EXISTS (SELECT 1 FROM unnest($2) c(cat)
                             WHERE (SELECT max(e.global_position) FROM kurier.events e WHERE e.category = c.cat) > $1)
           END
$fn$;

-- The row, locked FOR UPDATE; KU404 if there is none. Operator actions wait
-- here for a batch in progress (run_projection holds the lock for its batch).
CREATE FUNCTION kurier._projection_lock(p_name text) RETURNS kurier.projections
    LANGUAGE plpgsql AS $fn$
DECLARE
    p kurier.projections;
BEGIN
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'kurier: projection % does not exist', coalesce(p_name, 'NULL')
            USING ERRCODE = 'KU404',
                  HINT = 'define it with kurier.define_projection or kurier.register_projection; kurier.projection_status() lists them';
    END IF;
    RETURN p;
END;
$fn$;

-- Checks a handler or reset function and returns its signature text,
-- schema-qualified and quoted, as stored in kurier.projections and called by
-- the generated code. p_role: 'handler' (one kurier.event argument) or 'reset'
-- (no arguments).
CREATE FUNCTION kurier._projection_check_function(p_name text, p_fn regprocedure, p_role text)
    RETURNS text LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    f   record;
    sig text;
BEGIN
    SELECT pr.oid, pr.proname, n.nspname, pr.prokind, pr.proretset, pr.provolatile, pr.pronargs,
           pr.proargtypes, pg_catalog.pg_get_function_identity_arguments(pr.oid) AS args
    INTO f
    FROM pg_catalog.pg_proc pr JOIN pg_catalog.pg_namespace n ON n.oid = pr.pronamespace
    WHERE pr.oid = p_fn::oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'kurier: % function % of projection % does not exist', p_role, p_fn::oid, p_name
            USING ERRCODE = '22023', HINT = 'create the function first';
    END IF;
    sig := format('%I.%I(%s)', f.nspname, f.proname, f.args);
    IF f.prokind <> 'f' THEN
        RAISE EXCEPTION 'kurier: % % of projection % is a %, not a function', p_role, sig, p_name,
            CASE f.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' WHEN 'w' THEN 'window function' ELSE f.prokind::text END
            USING ERRCODE = '22023', HINT = 'use CREATE FUNCTION ... RETURNS void';
    END IF;
    IF p_role = 'handler' AND (f.pronargs <> 1 OR f.proargtypes[0] <> 'kurier.event'::regtype::oid) THEN
        RAISE EXCEPTION 'kurier: handler % of projection % must take exactly one argument of type kurier.event, not (%)',
            sig, p_name, f.args
            USING ERRCODE = '22023',
                  HINT = 'CREATE FUNCTION ' || format('%I.%I', f.nspname, f.proname) || '(e kurier.event) RETURNS void ...';
    END IF;
    IF p_role = 'reset' AND f.pronargs <> 0 THEN
        RAISE EXCEPTION 'kurier: reset function % of projection % must take no arguments, not (%)', sig, p_name, f.args
            USING ERRCODE = '22023', HINT = 'it empties the read model; rebuild_projection calls it without arguments';
    END IF;
    IF f.proretset THEN
        RAISE EXCEPTION 'kurier: % % of projection % returns a set', p_role, sig, p_name
            USING ERRCODE = '22023', HINT = 'return void: the return value is ignored';
    END IF;
    -- A STABLE or IMMUTABLE function cannot write its read model (PostgreSQL
    -- refuses INSERT there), and the planner may fold or skip its calls.
    IF f.provolatile <> 'v' THEN
        RAISE EXCEPTION 'kurier: % % of projection % is %, but it writes the read model', p_role, sig, p_name,
            CASE f.provolatile WHEN 's' THEN 'STABLE' ELSE 'IMMUTABLE' END
            USING ERRCODE = '22023', HINT = 'declare it VOLATILE (the default)';
    END IF;
    -- The stored text names exactly this function: an explicit cast of the
    -- argument list makes the call resolve to it alone.
    RETURN format('%I.%I', f.nspname, f.proname) ||
           CASE p_role WHEN 'handler' THEN '(kurier.event)' ELSE '()' END;
END;
$fn$;

-- The body of the generated function kurier._projection_<name>: one pass
-- over read_all calling the handler statically, once per event of the
-- projection's categories, in order.
--
-- Why generated: a static call is planned once per session (PL/pgSQL caches
-- the simple expression "handler(e) IS NULL" and the handler's own plans),
-- where EXECUTE per event re-plans every call; NOTES.md has the numbers.
--
-- Why one exception block around the whole pass, not one per event: a block
-- is a subtransaction, and one per event would put thousands of subxids into
-- one transaction (past 64 every snapshot in the cluster has to consult
-- pg_subtrans). One block per pass costs one subxid, and because PL/pgSQL
-- variables survive its rollback, `cur` still names the event that failed.
-- The caller (kurier.run_projection) then re-applies the events before it.
--
-- Arguments: start after after_position, read at most max_count events, only
-- call the handler for categories (NULL = all), stop before stop_before
-- (NULL = no limit). Results: read_count events read and kept (handler called
-- for `applied` of them), last_position the last one read (= after_position
-- if none); stopped_at = the first event at or after stop_before, if the pass
-- stopped there. On an error: read_count = applied = 0, last_position =
-- after_position (the pass was rolled back), failed_position = the event
-- being handled (NULL: read_all itself failed), failed_prefix = events read
-- before it, and the error fields.
CREATE FUNCTION kurier._projection_wrapper_body(p_handler text) RETURNS text
    LANGUAGE sql STABLE
    AS $fn$ SELECT format($body$
DECLARE
    e   kurier.event;
    cur bigint;
    n   int := 0;
    -- One category: read it through the category index. Several: read every
    -- category and filter here, because the checkpoint is a global position
    -- and per-category reads only prove what each of them covered.
    cat text := CASE WHEN cardinality(categories) = 1 THEN categories[1] END;
BEGIN
    read_count := 0;
    applied := 0;
    last_position := after_position;
    BEGIN
        FOR e IN SELECT * FROM kurier.read_all(after_position, max_count, cat) LOOP
            cur := e.global_position;
            IF cur >= stop_before THEN
                stopped_at := cur;
                EXIT;
            END IF;
            IF categories IS NULL OR e.category = ANY (categories) THEN
                -- The return value is ignored. An IS NULL test rather than
                -- PERFORM: PL/pgSQL evaluates it as a simple expression,
                -- without starting the executor for every event.
                IF %s(e) IS NULL THEN
                    NULL;
                END IF;
                applied := applied + 1;
            END IF;
            n := n + 1;
            read_count := n;
            last_position := cur;
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT,
            error_detail = PG_EXCEPTION_DETAIL, error_hint = PG_EXCEPTION_HINT,
            error_context = PG_EXCEPTION_CONTEXT;
        failed_position := cur;
        failed_prefix := n;
        read_count := 0;
        applied := 0;
        last_position := after_position;
        stopped_at := NULL;
    END;
END
$body$, left(p_handler, -length('(kurier.event)'))) $fn$;

-- Creates (or replaces) kurier._projection_<name> for the handler, unless it
-- already has exactly this body (define_projection is called at every start
-- of an application: no catalog churn, no invalidation of running plans).
CREATE FUNCTION kurier._projection_generate(p_name text, p_handler text) RETURNS void
    LANGUAGE plpgsql AS $fn$
DECLARE
    body text := kurier._projection_wrapper_body(p_handler);
    fn   regprocedure := to_regprocedure(format('kurier.%I(bigint, integer, text[], bigint)', '_projection_' || p_name));
BEGIN
    IF fn IS NOT NULL AND (SELECT pr.prosrc FROM pg_catalog.pg_proc pr WHERE pr.oid = fn) = body THEN
        RETURN;
    END IF;
    EXECUTE format($ddl$CREATE OR REPLACE FUNCTION kurier.%I(
    after_position bigint, max_count integer, categories text[], stop_before bigint,
    OUT read_count integer, OUT applied integer, OUT last_position bigint, OUT stopped_at bigint,
    OUT failed_position bigint, OUT failed_prefix integer,
    OUT error_state text, OUT error_message text, OUT error_detail text, OUT error_hint text,
    OUT error_context text)
    LANGUAGE plpgsql VOLATILE AS %L$ddl$, '_projection_' || p_name, body);
    EXECUTE format('COMMENT ON FUNCTION kurier.%I(bigint, integer, text[], bigint) IS %L',
                   '_projection_' || p_name,
                   'generated by kurier.define_projection for projection ' || p_name || '; do not edit or call');
END;
$fn$;

-- Sorted and deduplicated categories, or NULL for all; refuses an empty
-- array, NULL or empty elements.
CREATE FUNCTION kurier._projection_categories(p_name text, p_categories text[]) RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    out text[];
BEGIN
    IF p_categories IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(p_categories) = 0 OR array_position(p_categories, NULL) IS NOT NULL
       OR '' = ANY (p_categories) THEN
        RAISE EXCEPTION 'kurier: categories of projection % must be NULL (all) or non-empty names, not %', p_name, p_categories
            USING ERRCODE = '22023', HINT = 'a category is the stream name up to its first "-": order-42 -> order';
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO out FROM unnest(p_categories) c;
    RETURN out;
END;
$fn$;

-- Shared by define_projection and register_projection. Returns 'defined'
-- (new), 'unchanged' (same definition: idempotent), or 'redefined'.
--
-- Redefinition policy: a different handler, reset function or set of
-- categories means the read model so far was built by another definition,
-- so it is refused (KU409) unless the projection is paused: pause, redefine,
-- rebuild if the model must be recomputed (or not, if the new handler is an
-- equivalent one under a new name), resume. Changing what a handler does is
-- CREATE OR REPLACE of the same function and needs no redefinition; a model
-- built differently is a new projection beside the old one (blue/green).
-- The retry settings are not part of the definition: given (not NULL), they
-- are updated at any time.
CREATE FUNCTION kurier._projection_define(
    p_name text, p_handler text, p_reset text, p_categories text[],
    p_retry_base_ms integer, p_retry_max_ms integer, p_max_attempts integer)
    RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    p       kurier.projections;
    created boolean;
    result  text;
BEGIN
    IF p_retry_base_ms <= 0 OR p_retry_max_ms <= 0 OR p_max_attempts < 1 OR p_retry_max_ms < p_retry_base_ms THEN
        RAISE EXCEPTION 'kurier: projection %: retry_base_ms and retry_max_ms must be > 0, retry_max_ms >= retry_base_ms and max_attempts >= 1 (got %, %, %)',
            p_name, p_retry_base_ms, p_retry_max_ms, p_max_attempts USING ERRCODE = '22023';
    END IF;
    -- Insert, or wait for a concurrent definer (speculative insertion) and
    -- then lock the row: definitions of one name are serialised, so two
    -- application instances starting at once never run the DDL together
    -- ("tuple concurrently updated").
    INSERT INTO kurier.projections AS pr (name, handler, reset, categories, retry_base_ms, retry_max_ms, max_attempts)
    VALUES (p_name, p_handler, p_reset, p_categories, coalesce(p_retry_base_ms, 1000),
            greatest(coalesce(p_retry_max_ms, 60000), coalesce(p_retry_base_ms, 1000)), coalesce(p_max_attempts, 5))
    ON CONFLICT ON CONSTRAINT projections_pkey DO NOTHING;
    created := FOUND;
    p := kurier._projection_lock(p_name);
    IF created THEN
        result := 'defined';
        PERFORM kurier._projection_log(p_name, 'defined', 0,
            jsonb_build_object('handler', p_handler, 'reset', p_reset, 'categories', to_jsonb(p_categories)));
    ELSIF p.handler IS NOT DISTINCT FROM p_handler AND p.reset IS NOT DISTINCT FROM p_reset
          AND p.categories IS NOT DISTINCT FROM p_categories THEN
        result := 'unchanged';
    ELSIF p.status <> 'paused' THEN
        RAISE EXCEPTION 'kurier: projection % is already defined differently (handler %, reset %, categories %) and is %',
            p_name, coalesce(p.handler, 'NULL (application code)'), coalesce(p.reset, 'NULL'),
            coalesce(p.categories::text, 'NULL (all)'), p.status
            USING ERRCODE = 'KU409',
                  HINT = 'build the new definition beside it under a new name (blue/green), or pause it '
                         '(kurier.pause_projection), redefine, rebuild if needed (kurier.rebuild_projection) and resume';
    ELSE
        UPDATE kurier.projections pr
        SET handler = p_handler, reset = p_reset, categories = p_categories,
            definition_version = pr.definition_version + 1, updated_at = clock_timestamp()
        WHERE pr.name = p_name;
        result := 'redefined';
        PERFORM kurier._projection_log(p_name, 'redefined', p.position,
            jsonb_build_object('handler', p_handler, 'reset', p_reset, 'categories', to_jsonb(p_categories),
                               'old_handler', p.handler, 'old_reset', p.reset, 'old_categories', to_jsonb(p.categories),
                               'definition_version', p.definition_version + 1));
    END IF;
    IF NOT created AND (p_retry_base_ms IS NOT NULL OR p_retry_max_ms IS NOT NULL OR p_max_attempts IS NOT NULL) THEN
        UPDATE kurier.projections pr
        SET retry_base_ms = coalesce(p_retry_base_ms, pr.retry_base_ms),
            retry_max_ms = greatest(coalesce(p_retry_max_ms, pr.retry_max_ms), coalesce(p_retry_base_ms, pr.retry_base_ms)),
            max_attempts = coalesce(p_max_attempts, pr.max_attempts)
        WHERE pr.name = p_name;
    END IF;
    IF p_handler IS NOT NULL THEN
        PERFORM kurier._projection_generate(p_name, p_handler);
    ELSIF NOT created AND p.handler IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION IF EXISTS kurier.%I(bigint, integer, text[], bigint)', '_projection_' || p_name);
    END IF;
    RETURN result;
END;
$fn$;

-- Registers (or idempotently re-registers) an SQL projection run by the
-- daemon through kurier.run_projection. handler: a VOLATILE function taking
-- exactly one kurier.event (its return value is ignored); reset: optional,
-- no arguments, called by kurier.rebuild_projection to empty the read model.
-- categories: NULL = all. The retry settings default to 1000 ms, 60000 ms
-- and 5 attempts. Returns 'defined', 'unchanged' or 'redefined' (see
-- kurier._projection_define for when a changed definition is accepted).
-- Creates kurier._projection_<name>, so the caller needs CREATE on this schema.
CREATE FUNCTION kurier.define_projection(
    name text, handler regprocedure, categories text[] DEFAULT NULL, reset regprocedure DEFAULT NULL,
    retry_base_ms integer DEFAULT NULL, retry_max_ms integer DEFAULT NULL, max_attempts integer DEFAULT NULL)
    RETURNS text LANGUAGE plpgsql AS $fn$
BEGIN
    IF name IS NULL OR NOT kurier._projection_valid_name(name) THEN
        RAISE EXCEPTION 'kurier: projection name % is invalid', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'a projection name is 1-50 characters of [a-z0-9_], not starting with a digit, e.g. orders_v2';
    END IF;
    IF handler IS NULL THEN
        RAISE EXCEPTION 'kurier: define_projection(%) needs a handler', name
            USING ERRCODE = '22023',
                  HINT = 'for a projection whose handler lives in application code, use kurier.register_projection';
    END IF;
    RETURN kurier._projection_define(name,
        kurier._projection_check_function(name, handler, 'handler'),
        CASE WHEN reset IS NOT NULL THEN kurier._projection_check_function(name, reset, 'reset') END,
        kurier._projection_categories(name, categories), retry_base_ms, retry_max_ms, max_attempts);
END;
$fn$;

-- Registers a projection whose handler lives in application code (e.g. Rust)
-- and whose checkpoint lives here (handler NULL). Same return values and
-- redefinition policy as define_projection.
CREATE FUNCTION kurier.register_projection(
    name text, categories text[] DEFAULT NULL, reset regprocedure DEFAULT NULL,
    retry_base_ms integer DEFAULT NULL, retry_max_ms integer DEFAULT NULL, max_attempts integer DEFAULT NULL)
    RETURNS text LANGUAGE plpgsql AS $fn$
BEGIN
    IF name IS NULL OR NOT kurier._projection_valid_name(name) THEN
        RAISE EXCEPTION 'kurier: projection name % is invalid', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'a projection name is 1-50 characters of [a-z0-9_], not starting with a digit, e.g. orders_v2';
    END IF;
    RETURN kurier._projection_define(name, NULL,
        CASE WHEN reset IS NOT NULL THEN kurier._projection_check_function(name, reset, 'reset') END,
        kurier._projection_categories(name, categories), retry_base_ms, retry_max_ms, max_attempts);
END;
$fn$;

-- Removes a projection and its generated function (not its read model, which
-- the application owns). The history stays. Returns whether it existed.
CREATE FUNCTION kurier.drop_projection(name text) RETURNS boolean
    LANGUAGE plpgsql AS $fn$
DECLARE
    p kurier.projections;
BEGIN
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = drop_projection.name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM kurier.projections pr WHERE pr.name = p.name;
    EXECUTE format('DROP FUNCTION IF EXISTS kurier.%I(bigint, integer, text[], bigint)', '_projection_' || p.name);
    PERFORM kurier._projection_log(p.name, 'dropped', p.position,
        jsonb_build_object('handler', p.handler, 'categories', to_jsonb(p.categories), 'status', p.status));
    RETURN true;
END;
$fn$;

-- Moves the checkpoint after a successful batch (the caller holds the row
-- lock, or is projection_checkpoint whose UPDATE is the CAS). Clears a
-- recorded failure once the checkpoint has passed it, and ends a rebuild when
-- nothing of the projection's categories is left after the new position.
-- Returns the new status.
CREATE FUNCTION kurier._projection_advance(p kurier.projections, p_to bigint, p_applied integer, p_check_caught_up boolean)
    RETURNS text LANGUAGE plpgsql AS $fn$
DECLARE
    done boolean := p_check_caught_up AND p.status = 'rebuilding'
                    AND NOT kurier._projection_events_after(p_to, p.categories);
BEGIN
    UPDATE kurier.projections pr
    SET position = p_to,
        events_applied = pr.events_applied + p_applied,
        status = CASE WHEN done THEN 'running' ELSE pr.status END,
        rebuild_started_at = CASE WHEN done THEN NULL ELSE pr.rebuild_started_at END,
        last_error = CASE WHEN pr.failed_position <= p_to THEN NULL ELSE pr.last_error END,
        last_error_detail = CASE WHEN pr.failed_position <= p_to THEN NULL ELSE pr.last_error_detail END,
        failed_attempts = CASE WHEN pr.failed_position <= p_to THEN 0 ELSE pr.failed_attempts END,
        retry_at = CASE WHEN pr.failed_position <= p_to THEN NULL ELSE pr.retry_at END,
        failed_position = CASE WHEN pr.failed_position <= p_to THEN NULL ELSE pr.failed_position END,
        updated_at = clock_timestamp()
    WHERE pr.name = p.name AND pr.position = p.position;
    IF NOT FOUND THEN
        -- Cannot happen under the row lock; the CAS stays as a second guard.
        RAISE EXCEPTION 'kurier: projection % is no longer at position %', p.name, p.position
            USING ERRCODE = 'KU409', HINT = 'roll back and run the batch again';
    END IF;
    IF done THEN
        PERFORM kurier._projection_log(p.name, 'caught_up', p_to,
            jsonb_build_object('rebuild_started_at', p.rebuild_started_at,
                               'seconds', extract(epoch FROM clock_timestamp() - p.rebuild_started_at)));
        RETURN 'running';
    END IF;
    RETURN p.status;
END;
$fn$;

-- Records a failure of the event at p_at, the checkpoint (already) being
-- right before it: attempts + 1 (1 if it is a different event than the last
-- failure), retry_at after the capped exponential backoff, and parked once
-- max_attempts is reached. The failed event is never passed here; only
-- resume (retry) or skip_projection_event (explicit, recorded) go on.
-- Returns the row as updated.
CREATE FUNCTION kurier._projection_fail(p_name text, p_at bigint, p_message text, p_detail jsonb)
    RETURNS kurier.projections LANGUAGE plpgsql AS $fn$
DECLARE
    p        kurier.projections;
    attempts integer;
    ev       record;
    detail   jsonb;
BEGIN
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = p_name;
    attempts := CASE WHEN p.failed_position = p_at THEN p.failed_attempts + 1 ELSE 1 END;
    SELECT e.event_id, e.stream, e.type, e.version INTO ev FROM kurier.events e WHERE e.global_position = p_at;
    detail := coalesce(p_detail, '{}'::jsonb) || jsonb_strip_nulls(jsonb_build_object(
        'event_id', ev.event_id, 'stream', ev.stream, 'type', ev.type, 'version', ev.version,
        'attempt', attempts));
    UPDATE kurier.projections pr
    SET last_error = p_message,
        last_error_detail = detail,
        failed_position = p_at,
        failed_attempts = attempts,
        status = CASE WHEN attempts >= pr.max_attempts THEN 'parked' ELSE pr.status END,
        retry_at = CASE WHEN attempts >= pr.max_attempts THEN NULL
                        ELSE clock_timestamp() + make_interval(secs => least(
                             pr.retry_base_ms::float8 * power(2::float8, least(attempts - 1, 40)),
                             pr.retry_max_ms::float8) / 1000.0) END,
        updated_at = clock_timestamp()
    WHERE pr.name = p_name
    RETURNING * INTO p;
    PERFORM kurier._projection_log(p_name, CASE WHEN p.status = 'parked' THEN 'parked' ELSE 'failed' END, p_at,
        detail || jsonb_build_object('error', p_message, 'retry_at', p.retry_at, 'checkpoint', p.position));
    RETURN p;
END;
$fn$;

-- Error classes that say nothing about the event (40: a serialisation
-- failure or deadlock; 53: out of memory or disk; 57: operator intervention;
-- 58: I/O; 55P03: a lock not available): re-raised to the caller, who
-- rolls back and tries again later, instead of being counted against the
-- event and parking the projection after a few seconds of a full disk.
CREATE FUNCTION kurier._projection_transient(sqlstate text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$ SELECT left($1, 2) IN ('40', '53', '57', '58') OR $1 = '55P03' $fn$;

-- Raises an error caught by the generated function again, as it was.
CREATE FUNCTION kurier._projection_reraise(p_state text, p_message text, p_detail text, p_hint text)
    RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_detail IS NOT NULL AND p_detail <> '' AND p_hint IS NOT NULL AND p_hint <> '' THEN
        RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, DETAIL = p_detail, HINT = p_hint;
    ELSIF p_detail IS NOT NULL AND p_detail <> '' THEN
        RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, DETAIL = p_detail;
    ELSIF p_hint IS NOT NULL AND p_hint <> '' THEN
        RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message, HINT = p_hint;
    END IF;
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_message;
END;
$fn$;

-- Runs one batch of an SQL projection in the caller's transaction: the
-- handler is called for each of the next (at most max_count) events of the
-- projection's categories, in order, and the checkpoint moves to the last
-- event read; the caller commits (or rolls back: nothing happened).
--
--   SELECT * FROM kurier.run_projection('orders', 1000);  then COMMIT.
--
-- Results:
--   applied     handler calls made (and kept)
--   read_count  events read, including other categories (the checkpoint moves over them)
--   position    the checkpoint after this call
--   more        true: a full batch was read, call again at once
--   status      the projection's status after this call
--   outcome     'applied'  events were applied (read_count > 0)
--               'idle'     nothing to read (more events may be in flight)
--               'busy'     another transaction holds this projection (SKIP LOCKED)
--               'stopped'  status is paused or parked: nothing done
--               'waiting'  a failure's backoff has not passed: retry at retry_at
--               'failed'   an event failed: the events before it are applied
--                          and the failure is recorded; COMMIT, retry at retry_at
--               'parked'   the same, and it was the last attempt: parked
--   retry_at    when to try again after 'waiting' or 'failed'
-- A rebuilding projection that read less than max_count and has nothing left
-- after its position becomes 'running' (status says so).
--
-- Errors raised (the caller rolls back; none of them is the event's fault):
-- KU404, 22023 (bad arguments, an application-run projection), read_all's
-- own (25000 outside READ COMMITTED, 25006 on a standby), and transient
-- errors from the handler (SQLSTATE classes 40, 53, 54, 57, 58, XX, 55P03).
--
-- A failing handler costs no subtransaction per event: the pass runs in one
-- subtransaction; if it fails at event F, the events before F are applied
-- again in a second one and the failure of F is recorded; if that second
-- pass fails earlier (a handler that does not fail the same way twice), one
-- single event is tried in a third. At most 3 subtransactions per call.
CREATE FUNCTION kurier.run_projection(
    name text, max_count integer DEFAULT 1000,
    OUT applied integer, OUT read_count integer, OUT "position" bigint, OUT more boolean,
    OUT status text, OUT outcome text, OUT retry_at timestamptz)
    LANGUAGE plpgsql AS $fn$
DECLARE
    p    kurier.projections;
    fn   text;
    call text;
    r    record;
    r2   record;
    f    record;
BEGIN
    IF max_count IS NULL OR max_count < 1 THEN
        RAISE EXCEPTION 'kurier: run_projection(%, max_count %) needs max_count >= 1', name, coalesce(max_count::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'e.g. 1000 when running, 10000 when rebuilding';
    END IF;
    applied := 0;
    read_count := 0;
    more := false;
    -- First without a lock: an idle poll (nothing committed after the
    -- checkpoint), a stopped projection or a pending backoff returns here
    -- without a row lock, so without writing the row and without taking a
    -- transaction id (a daemon polling many projections would otherwise burn
    -- an xid per poll). Events not yet visible here are not readable by
    -- read_all either. A rebuild goes on to the locked path, which ends it.
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = run_projection.name;
    IF NOT FOUND THEN
        PERFORM kurier._projection_lock(run_projection.name);  -- raises KU404
    END IF;
    IF p.handler IS NOT NULL AND p.status <> 'rebuilding'
       AND (p.status <> 'running' OR p.retry_at > clock_timestamp()
            OR NOT kurier._projection_events_after(p.position, p.categories)) THEN
        "position" := p.position;
        status := p.status;
        retry_at := p.retry_at;
        outcome := CASE WHEN p.status <> 'running' THEN 'stopped'
                        WHEN p.retry_at > clock_timestamp() THEN 'waiting' ELSE 'idle' END;
        RETURN;
    END IF;
    -- SKIP LOCKED: a second runner (another daemon, an operator action in
    -- progress) makes this call return 'busy' at once instead of queueing
    -- behind the batch, or failing the caller's transaction as NOWAIT would.
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = run_projection.name FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        SELECT pr.position, pr.status, pr.retry_at INTO "position", status, retry_at
        FROM kurier.projections pr WHERE pr.name = run_projection.name;
        IF NOT FOUND THEN
            PERFORM kurier._projection_lock(run_projection.name);  -- raises KU404
        END IF;
        outcome := 'busy';
        RETURN;
    END IF;
    "position" := p.position;
    status := p.status;
    retry_at := p.retry_at;
    IF p.handler IS NULL THEN
        RAISE EXCEPTION 'kurier: projection % is run by application code (it has no SQL handler)', p.name
            USING ERRCODE = '22023',
                  HINT = 'its runner reads kurier.read_all and moves the checkpoint with kurier.projection_checkpoint';
    END IF;
    IF p.status NOT IN ('running', 'rebuilding') THEN
        outcome := 'stopped';
        RETURN;
    END IF;
    IF p.retry_at > clock_timestamp() THEN
        outcome := 'waiting';
        RETURN;
    END IF;
    fn := '_projection_' || p.name;
    IF to_regprocedure(format('kurier.%I(bigint, integer, text[], bigint)', fn)) IS NULL THEN
        RAISE EXCEPTION 'kurier: the generated function kurier.% of projection % is missing', fn, p.name
            USING ERRCODE = 'KU404', HINT = 'call kurier.define_projection again with the same arguments';
    END IF;
    call := format('SELECT * FROM kurier.%I($1, $2, $3, $4)', fn);

    EXECUTE call INTO r USING p.position, max_count, p.categories, NULL::bigint;
    IF r.error_state IS NOT NULL AND (r.failed_position IS NULL OR kurier._projection_transient(r.error_state)) THEN
        PERFORM kurier._projection_reraise(r.error_state, r.error_message, r.error_detail, r.error_hint);
    END IF;
    IF r.error_state IS NULL THEN
        status := kurier._projection_advance(p, r.last_position, r.applied, r.read_count < max_count);
        applied := r.applied;
        read_count := r.read_count;
        "position" := r.last_position;
        more := r.read_count = max_count;
        outcome := CASE WHEN r.read_count > 0 THEN 'applied' ELSE 'idle' END;
        retry_at := NULL;
        RETURN;
    END IF;

    -- The event at r.failed_position failed; the pass was rolled back.
    f := r;
    IF f.failed_prefix > 0 THEN
        -- Apply the events before it again, and stop at it.
        EXECUTE call INTO r2 USING p.position, max_count, p.categories, f.failed_position;
        IF r2.error_state IS NOT NULL AND (r2.failed_position IS NULL OR kurier._projection_transient(r2.error_state)) THEN
            PERFORM kurier._projection_reraise(r2.error_state, r2.error_message, r2.error_detail, r2.error_hint);
        END IF;
        IF r2.error_state IS NOT NULL THEN
            -- An earlier event failed this time. Try exactly one event, so
            -- that the call ends in a consistent state either way.
            EXECUTE call INTO r2 USING p.position, 1, p.categories, NULL::bigint;
            IF r2.error_state IS NOT NULL AND (r2.failed_position IS NULL OR kurier._projection_transient(r2.error_state)) THEN
                PERFORM kurier._projection_reraise(r2.error_state, r2.error_message, r2.error_detail, r2.error_hint);
            END IF;
            IF r2.error_state IS NULL THEN
                status := kurier._projection_advance(p, r2.last_position, r2.applied, false);
                applied := r2.applied;
                read_count := r2.read_count;
                "position" := r2.last_position;
                more := true;
                outcome := CASE WHEN r2.read_count > 0 THEN 'applied' ELSE 'idle' END;
                retry_at := NULL;
                RETURN;
            END IF;
            f := r2;  -- the first event after the checkpoint failed
        ELSE
            status := kurier._projection_advance(p, r2.last_position, r2.applied, false);
            applied := r2.applied;
            read_count := r2.read_count;
            "position" := r2.last_position;
            IF r2.stopped_at IS DISTINCT FROM f.failed_position THEN
                -- The second read ended before the failed event (read_all
                -- gave less this time), or the failed event is gone (erased
                -- meanwhile): nothing is proven about it; call again.
                more := true;
                outcome := CASE WHEN r2.read_count > 0 THEN 'applied' ELSE 'idle' END;
                retry_at := NULL;
                RETURN;
            END IF;
            SELECT * INTO p FROM kurier.projections pr WHERE pr.name = p.name;
        END IF;
    END IF;
    p := kurier._projection_fail(p.name, f.failed_position, f.error_message,
        jsonb_strip_nulls(jsonb_build_object('sqlstate', f.error_state, 'detail', nullif(f.error_detail, ''),
                                             'hint', nullif(f.error_hint, ''), 'context', nullif(f.error_context, ''))));
    status := p.status;
    retry_at := p.retry_at;
    "position" := p.position;
    more := false;
    outcome := CASE WHEN p.status = 'parked' THEN 'parked' ELSE 'failed' END;
END;
$fn$;

-- The checkpoint of a projection run by application code: call it in the
-- transaction that applied the events after from_position up to and
-- including to_position (the last position kurier.read_all returned), before
-- COMMIT. It moves the checkpoint only if it is still at from_position
-- (compare-and-set): otherwise another runner moved it, or it was rebuilt,
-- and it raises KU409, so that the caller's transaction, with its read-model
-- writes, rolls back. Also clears a failure the checkpoint has passed and
-- ends a rebuild that has caught up.
CREATE FUNCTION kurier.projection_checkpoint(name text, from_position bigint, to_position bigint)
    RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    p   kurier.projections;
    cur bigint;
BEGIN
    IF from_position IS NULL OR to_position IS NULL OR to_position < from_position OR from_position < 0 THEN
        RAISE EXCEPTION 'kurier: projection_checkpoint(%, %, %) needs 0 <= from_position <= to_position',
            name, coalesce(from_position::text, 'NULL'), coalesce(to_position::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'to move a checkpoint back, use kurier.rebuild_projection';
    END IF;
    IF to_position > coalesce(pg_sequence_last_value('kurier.event_position'), 0) THEN
        RAISE EXCEPTION 'kurier: projection_checkpoint(%, %, %): no event has position % yet', name, from_position,
            to_position, to_position
            USING ERRCODE = '22023', HINT = 'move the checkpoint to the last position kurier.read_all returned';
    END IF;
    -- The CAS. Under READ COMMITTED a concurrent runner's UPDATE makes this
    -- one wait, then re-check position = from_position on the new row
    -- version: no row, KU409.
    SELECT * INTO p FROM kurier.projections pr
    WHERE pr.name = projection_checkpoint.name AND pr.position = from_position FOR UPDATE;
    IF NOT FOUND THEN
        SELECT pr.position INTO cur FROM kurier.projections pr WHERE pr.name = projection_checkpoint.name;
        IF NOT FOUND THEN
            PERFORM kurier._projection_lock(projection_checkpoint.name);  -- raises KU404
        END IF;
        RAISE EXCEPTION 'kurier: projection % is at position %, not %: another runner moved it, or it was rebuilt',
            name, cur, from_position
            USING ERRCODE = 'KU409',
                  HINT = 'roll back this transaction (its read-model writes must not commit) and start again from the stored position';
    END IF;
    PERFORM kurier._projection_advance(p, to_position, 0, true);
END;
$fn$;

-- Records the failure of the event at failed_position for a projection run
-- by application code, with the same attempts, backoff and parking as SQL
-- projections. Call it in its own transaction after rolling back the one in
-- which the event failed. The checkpoint must be right before the event: no
-- event of the projection's categories may lie between (checkpoint the
-- events before it first), so that a later skip passes exactly this event.
CREATE FUNCTION kurier.projection_failed(name text, failed_position bigint, error text, detail jsonb DEFAULT NULL,
    OUT status text, OUT failed_attempts integer, OUT retry_at timestamptz)
    LANGUAGE plpgsql AS $fn$
DECLARE
    p kurier.projections;
BEGIN
    p := kurier._projection_lock(name);
    IF failed_position IS NULL OR failed_position <= p.position
       OR NOT EXISTS (SELECT 1 FROM kurier.events e WHERE e.global_position = failed_position) THEN
        RAISE EXCEPTION 'kurier: projection % is at position %; % is not the position of an event after it',
            name, p.position, coalesce(failed_position::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'pass the global_position of the event that failed';
    END IF;
    IF EXISTS (SELECT 1 FROM kurier.events e
               WHERE e.global_position > p.position AND e.global_position < failed_position
                 AND (p.categories IS NULL OR e.category = ANY (p.categories))) THEN
        RAISE EXCEPTION 'kurier: projection % is at position %, and events of its categories lie between it and the failed event %',
            name, p.position, failed_position
            USING ERRCODE = 'KU409', HINT = 'apply the events before the failing one and move the checkpoint to just before it first';
    END IF;
    IF detail IS NOT NULL AND jsonb_typeof(detail) <> 'object' THEN
        RAISE EXCEPTION 'kurier: projection_failed(%): detail must be a JSON object', name USING ERRCODE = '22023';
    END IF;
    p := kurier._projection_fail(name, failed_position, coalesce(error, 'unknown error'), detail);
    status := p.status;
    failed_attempts := p.failed_attempts;
    retry_at := p.retry_at;
END;
$fn$;

-- Operator: stop running the projection after the batch in progress (it
-- waits for it). A parked projection stays parked (resume or skip it).
-- Returns the new status; pausing a paused projection changes nothing.
CREATE FUNCTION kurier.pause_projection(name text) RETURNS text
    LANGUAGE plpgsql AS $fn$
DECLARE
    p kurier.projections := kurier._projection_lock(name);
BEGIN
    IF p.status = 'paused' THEN
        RETURN 'paused';
    END IF;
    IF p.status = 'parked' THEN
        RAISE EXCEPTION 'kurier: projection % is parked at position % (%)', name, p.failed_position, p.last_error
            USING ERRCODE = 'KU409',
                  HINT = 'kurier.resume_projection retries the event; kurier.skip_projection_event skips it';
    END IF;
    UPDATE kurier.projections pr SET status = 'paused', updated_at = clock_timestamp() WHERE pr.name = p.name;
    PERFORM kurier._projection_log(p.name, 'paused', p.position, jsonb_build_object('from', p.status));
    RETURN 'paused';
END;
$fn$;

-- Operator: run a paused or parked projection again, and retry now (the
-- failure count, backoff and error are cleared; the history keeps them). A
-- rebuild that was paused or parked goes on as 'rebuilding'. On a running
-- projection waiting for a retry, it clears the backoff; otherwise it changes
-- nothing. Returns the new status.
CREATE FUNCTION kurier.resume_projection(name text) RETURNS text
    LANGUAGE plpgsql AS $fn$
DECLARE
    p   kurier.projections := kurier._projection_lock(name);
    new text;
BEGIN
    new := CASE WHEN p.rebuild_started_at IS NOT NULL THEN 'rebuilding' ELSE 'running' END;
    IF p.status IN ('running', 'rebuilding') AND p.failed_position IS NULL AND p.retry_at IS NULL THEN
        RETURN p.status;
    END IF;
    UPDATE kurier.projections pr
    SET status = new, last_error = NULL, last_error_detail = NULL, failed_position = NULL,
        failed_attempts = 0, retry_at = NULL, updated_at = clock_timestamp()
    WHERE pr.name = p.name;
    PERFORM kurier._projection_log(p.name, 'resumed', p.position,
        jsonb_strip_nulls(jsonb_build_object('from', p.status, 'failed_position', p.failed_position,
                                             'failed_attempts', p.failed_attempts, 'error', p.last_error)));
    RETURN new;
END;
$fn$;

-- Operator: skip the event a parked projection failed on. Only when parked,
-- and only the event that failed (position must equal failed_position, so a
-- stale command cannot skip another event). The checkpoint was right before
-- it, so exactly this one event is passed; the skip is recorded with the
-- error and the reason. The projection then runs again. Returns the new status.
CREATE FUNCTION kurier.skip_projection_event(name text, "position" bigint, reason text DEFAULT NULL) RETURNS text
    LANGUAGE plpgsql AS $fn$
DECLARE
    p   kurier.projections := kurier._projection_lock(name);
    new text;
BEGIN
    IF p.status <> 'parked' THEN
        RAISE EXCEPTION 'kurier: projection % is %, not parked: only the failed event of a parked projection can be skipped',
            name, p.status
            USING ERRCODE = 'KU409', HINT = 'a failing projection parks after max_attempts; see kurier.projection_status()';
    END IF;
    IF skip_projection_event."position" IS DISTINCT FROM p.failed_position THEN
        RAISE EXCEPTION 'kurier: projection % failed at position %, not %', name, p.failed_position,
            coalesce(skip_projection_event."position"::text, 'NULL')
            USING ERRCODE = 'KU409', HINT = format('kurier.skip_projection_event(%L, %s) skips the event that failed', name, p.failed_position);
    END IF;
    new := CASE WHEN p.rebuild_started_at IS NOT NULL THEN 'rebuilding' ELSE 'running' END;
    UPDATE kurier.projections pr
    SET position = p.failed_position, status = new, last_error = NULL, last_error_detail = NULL,
        failed_position = NULL, failed_attempts = 0, retry_at = NULL, updated_at = clock_timestamp()
    WHERE pr.name = p.name AND pr.position = p.position;
    PERFORM kurier._projection_log(p.name, 'skipped', p.failed_position,
        coalesce(p.last_error_detail, '{}'::jsonb) || jsonb_strip_nulls(jsonb_build_object(
            'error', p.last_error, 'attempts', p.failed_attempts, 'reason', reason, 'checkpoint_before', p.position)));
    RETURN new;
END;
$fn$;

-- Operator: replay from the first event. In the caller's transaction (it
-- waits for a batch in progress): position 0, status 'rebuilding', failure
-- cleared, and the reset function, if one was defined, is called to empty the
-- read model. Without a reset function, empty the read model in the same
-- transaction (BEGIN; TRUNCATE ...; SELECT kurier.rebuild_projection(...);
-- COMMIT). A paused projection is resumed by this. Recorded ('rebuild', and
-- 'reset' when the reset function ran). Returns 'rebuilding'.
CREATE FUNCTION kurier.rebuild_projection(name text) RETURNS text
    LANGUAGE plpgsql AS $fn$
DECLARE
    p  kurier.projections := kurier._projection_lock(name);
    fn regprocedure;
BEGIN
    UPDATE kurier.projections pr
    SET position = 0, status = 'rebuilding', rebuild_started_at = clock_timestamp(), events_applied = 0,
        last_error = NULL, last_error_detail = NULL, failed_position = NULL, failed_attempts = 0,
        retry_at = NULL, updated_at = clock_timestamp()
    WHERE pr.name = p.name;
    PERFORM kurier._projection_log(p.name, 'rebuild', 0,
        jsonb_strip_nulls(jsonb_build_object('from_position', p.position, 'from_status', p.status, 'reset', p.reset)));
    IF p.reset IS NOT NULL THEN
        -- The call is built again from pg_proc, not from the stored text:
        -- whoever can UPDATE kurier.projections cannot make this run SQL.
        fn := to_regprocedure(p.reset);
        IF fn IS NULL THEN
            RAISE EXCEPTION 'kurier: reset function % of projection % does not exist any more', p.reset, p.name
                USING ERRCODE = 'KU404',
                      HINT = 'create it again, or pause and redefine the projection without it';
        END IF;
        EXECUTE (SELECT format('SELECT %I.%I()', n.nspname, pr.proname)
                 FROM pg_catalog.pg_proc pr JOIN pg_catalog.pg_namespace n ON n.oid = pr.pronamespace
                 WHERE pr.oid = fn);
        PERFORM kurier._projection_log(p.name, 'reset', 0, jsonb_build_object('function', p.reset));
    END IF;
    RETURN 'rebuilding';
END;
$fn$;

-- Whether the projection is running and no committed event of its
-- categories lies after its position (blue/green: switch readers to a new
-- projection when this is true). Events still in flight may follow; a
-- projection that is caught up stays within a batch of the head.
CREATE FUNCTION kurier.projection_caught_up(name text) RETURNS boolean
    LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    p kurier.projections;
BEGIN
    SELECT * INTO p FROM kurier.projections pr WHERE pr.name = projection_caught_up.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'kurier: projection % does not exist', coalesce(name, 'NULL')
            USING ERRCODE = 'KU404', HINT = 'kurier.projection_status() lists the projections';
    END IF;
    RETURN p.status = 'running' AND NOT kurier._projection_events_after(p.position, p.categories);
END;
$fn$;

-- One row per projection (or the one named):
--   events_behind   committed events of its categories after its position,
--                   counted exactly up to 1,000,000 (1000000 means "at least")
--   seconds_behind  age of its oldest unapplied event (the first after its
--                   position in each of its categories), 0 if none
--   last_position   the last global position drawn (head of the store)
CREATE FUNCTION kurier.projection_status(name text DEFAULT NULL)
    RETURNS TABLE (name text, status text, "position" bigint, last_position bigint,
                   events_behind bigint, seconds_behind double precision, caught_up boolean,
                   last_error text, failed_position bigint, failed_attempts integer, retry_at timestamptz,
                   updated_at timestamptz, handler regprocedure, categories text[], events_applied bigint,
                   rebuild_started_at timestamptz, last_error_detail jsonb)
    LANGUAGE sql STABLE
    AS $fn$
    SELECT p.name, p.status, p.position, h.last_position,
           b.n, coalesce(extract(epoch FROM now() - b.first_at)::float8, 0),
           p.status = 'running' AND b.n = 0,
           p.last_error, p.failed_position, p.failed_attempts, p.retry_at, p.updated_at,
           to_regprocedure(p.handler), p.categories, p.events_applied, p.rebuild_started_at, p.last_error_detail
    FROM kurier.projections p
    CROSS JOIN (SELECT coalesce(pg_sequence_last_value('kurier.event_position'), 0) AS last_position) h
    -- Two branches each, so that each query is planned for its index: the
    -- primary key for all categories, (category, global_position) per
    -- category otherwise (ORDER BY makes the ordered index scan the cheap plan
    -- whatever the position is).
    CROSS JOIN LATERAL (
        SELECT CASE WHEN p.categories IS NULL
                    THEN (SELECT count(*) FROM (SELECT 1 FROM kurier.events e
                                                WHERE e.global_position > p.position
                                                ORDER BY e.global_position LIMIT 1000000) x)
                    ELSE least(1000000, (SELECT sum(k.n)::bigint FROM unnest(p.categories) c(cat)
                                         CROSS JOIN LATERAL (
                                             SELECT count(*) AS n FROM (SELECT 1 FROM kurier.events e
                                                 WHERE e.category = c.cat AND e.global_position > p.position
                                                 ORDER BY e.global_position LIMIT 1000000) x) k))
               END AS n,
               CASE WHEN p.categories IS NULL
                    THEN (SELECT e.recorded_at FROM kurier.events e WHERE e.global_position > p.position
                          ORDER BY e.global_position LIMIT 1)
                    ELSE (SELECT min(f.recorded_at) FROM unnest(p.categories) c(cat)
                          CROSS JOIN LATERAL (SELECT e.recorded_at FROM kurier.events e
                                              WHERE e.category = c.cat AND e.global_position > p.position
                                              ORDER BY e.global_position LIMIT 1) f)
               END AS first_at) b
    WHERE $1 IS NULL OR p.name = $1
    ORDER BY p.name
$fn$;
