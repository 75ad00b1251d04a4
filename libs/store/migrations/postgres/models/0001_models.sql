-- The model registry owned by model-manager: named models and their
-- immutable versions (content digest + lineage + metrics).
CREATE TABLE models (
    name          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    -- The highest version handed out; bumped under the row lock, so
    -- concurrent inserts get distinct, consecutive numbers.
    last_version  BIGINT NOT NULL CHECK (last_version >= 0)
);

CREATE TABLE model_versions (
    name           TEXT COLLATE "C" NOT NULL REFERENCES models (name),
    version        BIGINT NOT NULL CHECK (version > 0),
    digest         TEXT NOT NULL,
    size_bytes     BIGINT NOT NULL CHECK (size_bytes >= 0),
    job_id         TEXT NOT NULL,
    round          BIGINT NOT NULL,
    parent_version BIGINT NOT NULL,
    -- DOUBLE PRECISION holds NaN (a diverged round) as is.
    loss           DOUBLE PRECISION NOT NULL,
    accuracy       DOUBLE PRECISION NOT NULL,
    samples        BIGINT NOT NULL CHECK (samples >= 0),
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE INDEX model_versions_job_id ON model_versions (job_id);
