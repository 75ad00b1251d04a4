-- The updates a round received, as f32 (decoded): with compression, more than
-- bytes_from_parties. Rounds recorded before read 0 (unknown).
ALTER TABLE job_rounds ADD COLUMN bytes_from_parties_uncompressed INTEGER NOT NULL DEFAULT 0 CHECK (bytes_from_parties_uncompressed >= 0);
