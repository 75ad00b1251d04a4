-- A model is identified by (namespace, name): the same name in two
-- namespaces is two models, each numbering its own versions (last_version
-- is now per namespace and name). Every row keeps its namespace; the keys
-- change around them.
ALTER TABLE model_versions DROP CONSTRAINT model_versions_name_fkey;
ALTER TABLE model_versions DROP CONSTRAINT model_versions_pkey;
ALTER TABLE models DROP CONSTRAINT models_pkey;
ALTER TABLE models ADD CONSTRAINT models_pkey PRIMARY KEY (namespace, name);
ALTER TABLE model_versions ADD CONSTRAINT model_versions_pkey
    PRIMARY KEY (namespace, name, version);
ALTER TABLE model_versions ADD CONSTRAINT model_versions_model_fkey
    FOREIGN KEY (namespace, name) REFERENCES models (namespace, name);
-- The primary key serves what this index did.
DROP INDEX model_versions_namespace;
