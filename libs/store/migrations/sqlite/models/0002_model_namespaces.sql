-- Every model belongs to the namespace of its first version; each version
-- repeats it, for listing by namespace. Models from before namespaces
-- belong to 'default'.
ALTER TABLE models ADD COLUMN namespace TEXT NOT NULL DEFAULT 'default';
ALTER TABLE model_versions ADD COLUMN namespace TEXT NOT NULL DEFAULT 'default';
CREATE INDEX model_versions_namespace ON model_versions (namespace, name, version);
