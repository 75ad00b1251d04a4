-- API tokens, looked up by the sha256 of the token (the token itself is
-- never stored). namespace is a namespace or '*' for all of them.
CREATE TABLE api_tokens (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT COLLATE "C" NOT NULL,
    namespace TEXT COLLATE "C" NOT NULL,
    role TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX api_tokens_sha256 ON api_tokens (sha256);
CREATE INDEX api_tokens_namespace ON api_tokens (namespace, created_at_ms, id);
