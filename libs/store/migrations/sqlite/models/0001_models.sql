-- The model registry owned by model-manager: named models and their
-- immutable versions (content digest + lineage + metrics).
CREATE TABLE models (
    name          TEXT    NOT NULL PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE model_versions (
    name           TEXT    NOT NULL REFERENCES models(name),
    version        INTEGER NOT NULL CHECK (version > 0),
    digest         TEXT    NOT NULL,
    size_bytes     INTEGER NOT NULL CHECK (size_bytes >= 0),
    job_id         TEXT    NOT NULL,
    round          INTEGER NOT NULL,
    parent_version INTEGER NOT NULL,
    -- NULL stands for NaN: SQLite stores a NaN REAL as NULL.
    loss           REAL,
    accuracy       REAL,
    samples        INTEGER NOT NULL CHECK (samples >= 0),
    created_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE INDEX model_versions_job_id ON model_versions (job_id);
