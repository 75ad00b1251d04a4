-- Updates left out of the aggregate, tasks that failed on their party, and the
-- accuracy the stop rule looks at.
ALTER TABLE job_rounds ADD COLUMN dropped_updates BIGINT NOT NULL DEFAULT 0 CHECK (dropped_updates >= 0);
ALTER TABLE job_rounds ADD COLUMN task_failures BIGINT NOT NULL DEFAULT 0 CHECK (task_failures >= 0);
ALTER TABLE job_rounds ADD COLUMN robust_accuracy DOUBLE PRECISION NOT NULL DEFAULT 0;
