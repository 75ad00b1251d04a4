-- The audit log: one row per state-changing API call (who, what, on which
-- object, when, the outcome). Append-only; seq is the listing order and the
-- page cursor. COLLATE "C" compares namespaces bytewise, as SQLite does.
CREATE TABLE audit_log (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    actor_kind TEXT NOT NULL,
    actor_id TEXT NOT NULL,
    actor_name TEXT NOT NULL,
    action TEXT NOT NULL,
    object_kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    namespace TEXT COLLATE "C" NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX audit_log_namespace ON audit_log (namespace, seq);
CREATE INDEX audit_log_time ON audit_log (time_ms);
