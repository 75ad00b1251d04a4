-- The job store owned by job-scheduler: jobs, their state-change events and
-- round history. COLLATE "C" orders ids and names bytewise, as SQLite does.
CREATE TABLE jobs (
    -- Insertion order: the keyset pagination cursor.
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    name TEXT NOT NULL,
    namespace TEXT COLLATE "C" NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    rounds_total BIGINT NOT NULL,
    rounds_completed BIGINT NOT NULL DEFAULT 0,
    coordinator_endpoint TEXT,
    coordinator_pid BIGINT,
    launch_attempts BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    -- Optimistic concurrency: bumped by every write.
    version BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX jobs_namespace_state ON jobs (namespace, state, seq);
CREATE INDEX jobs_state ON jobs (state, seq);

CREATE TABLE job_events (
    job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_rounds (
    job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    round BIGINT NOT NULL,
    eval_loss DOUBLE PRECISION NOT NULL,
    eval_accuracy DOUBLE PRECISION NOT NULL,
    eval_samples BIGINT NOT NULL,
    train_loss DOUBLE PRECISION NOT NULL,
    updates BIGINT NOT NULL,
    model_version BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, round)
);
