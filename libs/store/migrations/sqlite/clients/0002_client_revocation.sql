-- When the party was revoked (NULL: never). A revoked party keeps its row:
-- registering again does not lift the revocation.
ALTER TABLE clients ADD COLUMN revoked_at_ms INTEGER;
