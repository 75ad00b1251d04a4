-- How much of the evaluation data a round's evaluation covers: the parties
-- that reported, of those holding the dataset when it was offered. Rounds
-- recorded before read 0 of 0 (unknown).
ALTER TABLE job_rounds ADD COLUMN eval_parties BIGINT NOT NULL DEFAULT 0 CHECK (eval_parties >= 0);
ALTER TABLE job_rounds ADD COLUMN eval_parties_expected BIGINT NOT NULL DEFAULT 0 CHECK (eval_parties_expected >= 0);
