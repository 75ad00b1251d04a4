CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    rounds_total INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0,
    coordinator_endpoint TEXT,
    coordinator_pid INTEGER,
    launch_attempts INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_namespace_state ON jobs (namespace, state);

CREATE TABLE job_events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_rounds (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    round INTEGER NOT NULL,
    eval_loss REAL NOT NULL,
    eval_accuracy REAL NOT NULL,
    eval_samples INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    updates INTEGER NOT NULL,
    model_version INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, round)
);
