-- Updates left out of the aggregate, tasks that failed on their party, and the
-- accuracy the stop rule looks at. NULL robust_accuracy stands for NaN: SQLite
-- stores a NaN REAL as NULL.
ALTER TABLE job_rounds ADD COLUMN dropped_updates INTEGER NOT NULL DEFAULT 0 CHECK (dropped_updates >= 0);
ALTER TABLE job_rounds ADD COLUMN task_failures INTEGER NOT NULL DEFAULT 0 CHECK (task_failures >= 0);
ALTER TABLE job_rounds ADD COLUMN robust_accuracy REAL DEFAULT 0;
