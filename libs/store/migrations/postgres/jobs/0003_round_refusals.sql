-- Round calls the coordinator refused (wrong party, duplicate, unknown token).
ALTER TABLE job_rounds ADD COLUMN refused_updates BIGINT NOT NULL DEFAULT 0 CHECK (refused_updates >= 0);
