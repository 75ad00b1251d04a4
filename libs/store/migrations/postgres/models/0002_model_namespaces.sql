-- Every model belongs to the namespace of its first version; each version
-- repeats it, for listing by namespace. Models from before namespaces
-- belong to 'default'; new rows must name theirs.
ALTER TABLE models ADD COLUMN namespace TEXT COLLATE "C" NOT NULL DEFAULT 'default';
ALTER TABLE models ALTER COLUMN namespace DROP DEFAULT;
ALTER TABLE model_versions ADD COLUMN namespace TEXT COLLATE "C" NOT NULL DEFAULT 'default';
ALTER TABLE model_versions ALTER COLUMN namespace DROP DEFAULT;
CREATE INDEX model_versions_namespace ON model_versions (namespace, name, version);
