-- The job's log: state changes (kind '') and what its coordinator reports
-- (kind 'task_failed', 'party_left_out', ...; from_state = to_state = the
-- job's state then).
ALTER TABLE job_events ADD COLUMN kind TEXT NOT NULL DEFAULT '';
ALTER TABLE job_events ADD COLUMN round BIGINT NOT NULL DEFAULT 0 CHECK (round >= 0);
ALTER TABLE job_events ADD COLUMN party TEXT NOT NULL DEFAULT '';
ALTER TABLE job_events ADD COLUMN task_id TEXT NOT NULL DEFAULT '';
-- Reported entries the job holds, against the per-job bound (state changes
-- do not count).
ALTER TABLE jobs ADD COLUMN log_entries BIGINT NOT NULL DEFAULT 0 CHECK (log_entries >= 0);
