"""Validates Kubernetes objects (one JSON object per *.json file in a directory) strictly:
built-in kinds against the Kubernetes schemas (kubernetes-validate, unknown fields fail), our
custom resources against the CRDs given (their openAPIV3Schema, unknown fields fail too, as the
API server would prune them silently). Run through `scripts/check-charts.sh --objects DIR`,
which provides the tools; libs/kube/tests/posted_objects.rs feeds it what the launchers post.

Usage: python validate-kube-objects.py OBJECTS_DIR CRD_FILE...
Prints one "ERROR <file>: ..." line per problem and exits 1 when there is any.
"""

import glob
import json
import os
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.30.0")


def strict(schema):
    """An OpenAPI v3 structural schema as JSON Schema: `nullable` allows null, int-or-string
    allows both, and an object with declared properties allows no others."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if k not in ("properties", "items", "additionalProperties")}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    elif "additionalProperties" in schema:
        out["additionalProperties"] = schema["additionalProperties"]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schemas(paths):
    """(apiVersion, kind) -> JSON Schema of the object, from each CRD's served versions."""
    schemas = {}
    for path in paths:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    # The API server owns these; the CRD schema leaves them out.
                    schema.setdefault("properties", {}).update(
                        {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
                    )
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: validate-kube-objects.py OBJECTS_DIR CRD_FILE...")
    objects_dir, crd_files = sys.argv[1], sys.argv[2:]
    custom = crd_schemas(crd_files)
    files = sorted(glob.glob(os.path.join(objects_dir, "*.json")))
    if not files:
        sys.exit(f"validate-kube-objects: no *.json objects in {objects_dir}")
    errors, checked = [], 0
    for path in files:
        name = os.path.basename(path)
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            errors.append(f"{name}: not a JSON object: {e}")
            continue
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"{name}: not a Kubernetes object (no apiVersion/kind)")
            continue
        what = f"{name}: {doc['kind']}/{(doc.get('metadata') or {}).get('name')}"
        schema = custom.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            problems = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for e in problems:
                at = ".".join(str(p) for p in e.path) or "(root)"
                errors.append(f"{what}: invalid against its CRD at {at}: {e.message}")
            checked += not problems
            continue
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
            checked += 1
        except kv.ValidationError as e:
            at = ".".join(str(p) for p in e.path) or "(root)"
            errors.append(f"{what}: invalid against Kubernetes {e.version} at {at}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"{what}: no schema: {e.message}")
    for e in errors:
        print(f"ERROR {e}")
    print(f"validate-kube-objects: {checked} of {len(files)} objects valid (Kubernetes {KUBE_VERSION}, strict)")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
