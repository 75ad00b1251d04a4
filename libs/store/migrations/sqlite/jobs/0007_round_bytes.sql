-- Tensor bytes a round moved: the global model served to its parties and the
-- updates they uploaded. Rounds recorded before read 0 (unknown).
ALTER TABLE job_rounds ADD COLUMN bytes_to_parties INTEGER NOT NULL DEFAULT 0 CHECK (bytes_to_parties >= 0);
ALTER TABLE job_rounds ADD COLUMN bytes_from_parties INTEGER NOT NULL DEFAULT 0 CHECK (bytes_from_parties >= 0);
