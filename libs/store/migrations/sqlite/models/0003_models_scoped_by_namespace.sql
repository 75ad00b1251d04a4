-- A model is identified by (namespace, name): the same name in two
-- namespaces is two models, each numbering its own versions. SQLite cannot
-- change a primary key in place, so both tables are rebuilt; every row keeps
-- its namespace. The old tables are renamed first (which also repoints the
-- versions' foreign key at the renamed models), so nothing references a
-- table while it is dropped.
ALTER TABLE model_versions RENAME TO model_versions_before_0003;
ALTER TABLE models RENAME TO models_before_0003;

CREATE TABLE models (
    namespace     TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);

CREATE TABLE model_versions (
    namespace      TEXT    NOT NULL,
    name           TEXT    NOT NULL,
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
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES models (namespace, name)
);

INSERT INTO models (namespace, name, created_at_ms)
    SELECT namespace, name, created_at_ms FROM models_before_0003;
INSERT INTO model_versions (namespace, name, version, digest, size_bytes, job_id, round,
                            parent_version, loss, accuracy, samples, created_at_ms)
    SELECT namespace, name, version, digest, size_bytes, job_id, round,
           parent_version, loss, accuracy, samples, created_at_ms
    FROM model_versions_before_0003;

-- Children first: the renamed versions still reference the renamed models.
DROP TABLE model_versions_before_0003;
DROP TABLE models_before_0003;

CREATE INDEX model_versions_job_id ON model_versions (job_id);
