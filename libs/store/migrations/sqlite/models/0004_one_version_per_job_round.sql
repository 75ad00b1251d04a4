-- A job stores one version per round: a retried upload of (job, round) finds
-- the version already stored (user uploads, with no job or round 0, keep
-- appending). Databases from before may hold several versions of one round;
-- the earliest keeps its place and later ones stay, marked round_duplicate,
-- outside the unique index.
ALTER TABLE model_versions ADD COLUMN round_duplicate INTEGER NOT NULL DEFAULT 0
    CHECK (round_duplicate IN (0, 1));
UPDATE model_versions SET round_duplicate = 1
    WHERE job_id <> '' AND round > 0 AND EXISTS (
        SELECT 1 FROM model_versions AS earlier
        WHERE earlier.namespace = model_versions.namespace
          AND earlier.name = model_versions.name
          AND earlier.job_id = model_versions.job_id
          AND earlier.round = model_versions.round
          AND earlier.version < model_versions.version);
CREATE UNIQUE INDEX model_versions_job_round ON model_versions (namespace, name, job_id, round)
    WHERE job_id <> '' AND round > 0 AND round_duplicate = 0;
