-- The client registry owned by client-selector: parties, what they hold and
-- their task counters.
CREATE TABLE clients (
    party TEXT COLLATE "C" PRIMARY KEY,
    datasets_json TEXT NOT NULL,
    resources_json TEXT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

CREATE TABLE client_stats (
    party TEXT COLLATE "C" PRIMARY KEY REFERENCES clients (party) ON DELETE CASCADE,
    tasks_offered BIGINT NOT NULL DEFAULT 0,
    tasks_accepted BIGINT NOT NULL DEFAULT 0,
    tasks_succeeded BIGINT NOT NULL DEFAULT 0,
    tasks_failed BIGINT NOT NULL DEFAULT 0
);
