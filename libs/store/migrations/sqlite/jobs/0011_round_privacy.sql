-- Under differential privacy: the ε spent once the round was released (+inf without
-- noise) and the round's sampling rate; rounds recorded before, and jobs without DP, read 0.
ALTER TABLE job_rounds ADD COLUMN dp_epsilon REAL NOT NULL DEFAULT 0;
ALTER TABLE job_rounds ADD COLUMN dp_sampling_rate REAL NOT NULL DEFAULT 0 CHECK (dp_sampling_rate >= 0 AND dp_sampling_rate <= 1);
