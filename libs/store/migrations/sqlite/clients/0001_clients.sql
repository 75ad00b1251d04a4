CREATE TABLE clients (
    party TEXT PRIMARY KEY,
    datasets_json TEXT NOT NULL,
    resources_json TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);

CREATE TABLE client_stats (
    party TEXT PRIMARY KEY REFERENCES clients (party) ON DELETE CASCADE,
    tasks_offered INTEGER NOT NULL DEFAULT 0,
    tasks_accepted INTEGER NOT NULL DEFAULT 0,
    tasks_succeeded INTEGER NOT NULL DEFAULT 0,
    tasks_failed INTEGER NOT NULL DEFAULT 0
);
