-- The parties a round's selection drew for training, with the weight each was drawn with
-- and what became of its task, as a JSON array; rounds recorded before have none.
ALTER TABLE job_rounds ADD COLUMN selected_json TEXT NOT NULL DEFAULT '[]';
