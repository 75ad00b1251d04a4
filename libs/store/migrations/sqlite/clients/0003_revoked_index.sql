-- The proxy lists revoked parties every few seconds: an index of just those rows.
CREATE INDEX clients_revoked ON clients (party) WHERE revoked_at_ms IS NOT NULL;
