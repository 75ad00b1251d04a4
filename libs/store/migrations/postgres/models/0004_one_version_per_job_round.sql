-- A job stores one version per round: a retried upload of (job, round) finds
-- the version already stored (user uploads, with no job or round 0, keep
-- appending). Databases from before may hold several versions of one round;
-- the earliest keeps its place and later ones stay, marked round_duplicate,
-- outside the unique index.
ALTER TABLE model_versions ADD COLUMN round_duplicate BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE model_versions AS later SET round_duplicate = TRUE
    WHERE job_id <> '' AND round > 0 AND EXISTS (
        SELECT 1 FROM model_versions AS earlier
        WHERE earlier.namespace = later.namespace
          AND earlier.name = later.name
          AND earlier.job_id = later.job_id
          AND earlier.round = later.round
          AND earlier.version < later.version);
CREATE UNIQUE INDEX model_versions_job_round ON model_versions (namespace, name, job_id, round)
    WHERE job_id <> '' AND round > 0 AND NOT round_duplicate;
