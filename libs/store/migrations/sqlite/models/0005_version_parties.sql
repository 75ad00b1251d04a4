-- The parties whose updates were aggregated into a job's round, as a JSON array of names;
-- versions from before (and uploads) have none.
ALTER TABLE model_versions ADD COLUMN parties_json TEXT NOT NULL DEFAULT '[]';
