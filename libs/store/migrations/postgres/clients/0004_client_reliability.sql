-- Each party's training tasks as their coordinators judged them at the round's end (never
-- the party's own word): counts by result, and recency-weighted counts (each result first
-- multiplies both by 0.9) that the reliability score reads.
ALTER TABLE client_stats ADD COLUMN results_finished BIGINT NOT NULL DEFAULT 0 CHECK (results_finished >= 0);
ALTER TABLE client_stats ADD COLUMN results_failed BIGINT NOT NULL DEFAULT 0 CHECK (results_failed >= 0);
ALTER TABLE client_stats ADD COLUMN results_timed_out BIGINT NOT NULL DEFAULT 0 CHECK (results_timed_out >= 0);
ALTER TABLE client_stats ADD COLUMN recent_finished DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE client_stats ADD COLUMN recent_unfinished DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE client_stats ADD COLUMN last_result_ms BIGINT NOT NULL DEFAULT 0;
