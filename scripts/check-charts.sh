#!/usr/bin/env bash
# Checks the Helm charts under charts/ without a cluster and without a helm binary:
#   - renders each chart (Helm v4 SDK through PyPI's helm-python-sdk, offline) with its
#     default values and with each ci/*.yaml,
#   - lints it the same way (`helm lint --strict`: warnings fail; info lines do not),
#   - validates every rendered manifest, and every CRD under crds/, with kubernetes-validate
#     in strict mode (unknown fields fail) against Kubernetes $COHORT_KUBE_VERSION (1.30),
#   - parses every Grafana dashboard (charts/*/dashboards/*.json, and each rendered ConfigMap
#     labelled grafana_dashboard): JSON, a uid and a title, a PromQL expr in every query (that
#     each expr names a metric the services export is integration-tests/tests/metrics.rs' job),
#   - then proves the check can fail: deliberately bad values must be refused.
# Custom resources (kind FederatedJob, group cohort.dev) have no schema there and are skipped;
# those of other operators the charts may render (the Prometheus Operator's ServiceMonitor) are
# validated as strictly against the trimmed CRDs in scripts/schemas/ (no network at check time).
#
# A chart that cannot render without values (cohort-client needs server.address and
# party.name) ships ci/minimal-values.yaml: its bare defaults must then be REFUSED with a
# "required" message, and ci/minimal-values.yaml stands for the defaults in the lint.
#
# Tools live in ${COHORT_TOOLS:-$HOME/.cache/cohort-tools}/charts-venv (created once).
# Usage: bash scripts/check-charts.sh [CHART_DIR...]   (default: every charts/*/Chart.yaml)
#        bash scripts/check-charts.sh --objects DIR
# The second form validates the objects the launchers post (one JSON file each, written by
# libs/kube/tests/posted_objects.rs) the same strict way, custom resources against our CRDs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${COHORT_TOOLS:-$HOME/.cache/cohort-tools}"
VENV="$TOOLS/charts-venv"
KUBE_VERSION="${COHORT_KUBE_VERSION:-1.30.0}"
# Exact pins (checked together on 2026-12-01): helm-python-sdk 0.2.2 bundles the Helm SDK v4.2.3.
REQUIREMENTS=(
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
    "jsonschema==4.26.0"
    "referencing==0.37.0"
    "PyYAML==6.0.4"
)

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_venv() {
    local stamp="$VENV/.cohort-requirements"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "${REQUIREMENTS[*]}" ]; then
        return
    fi
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        echo "check-charts: installing python3-venv" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "check-charts: creating $VENV" >&2
    rm -rf "$VENV"
    mkdir -p "$TOOLS"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQUIREMENTS[@]}"
    printf '%s' "${REQUIREMENTS[*]}" >"$stamp"
}

ensure_venv
export KUBE_VERSION
export COHORT_ROOT="$ROOT"

if [ "${1:-}" = "--objects" ]; then
    [ $# -eq 2 ] || { echo "usage: check-charts.sh --objects DIR" >&2; exit 2; }
    exec "$VENV/bin/python" "$ROOT/scripts/validate-kube-objects.py" "$2" "$ROOT"/charts/*/crds/*.yaml
fi

charts=("$@")
if [ ${#charts[@]} -eq 0 ]; then
    for c in "$ROOT"/charts/*/Chart.yaml; do
        [ -f "$c" ] && charts+=("$(dirname "$c")")
    done
fi
if [ ${#charts[@]} -eq 0 ]; then
    echo "check-charts: no charts under $ROOT/charts" >&2
    exit 1
fi

exec "$VENV/bin/python" - "${charts[@]}" <<'PY'
import copy
import glob
import os
import sys
import re
import tempfile
from collections import Counter

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv

helm.disable_logging()
KUBE_VERSION = os.environ["KUBE_VERSION"]
ROOT = os.environ["COHORT_ROOT"]


def load_validator():
    """scripts/validate-kube-objects.py, for its CRD → strict JSON Schema conversion."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "validate_kube_objects", os.path.join(ROOT, "scripts", "validate-kube-objects.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


import jsonschema
SCHEMA_CRDS = sorted(glob.glob(os.path.join(ROOT, "scripts", "schemas", "*.yaml")))
# (apiVersion, kind) → strict JSON Schema of other operators' resources the charts render.
OPERATOR_SCHEMAS = load_validator().crd_schemas(SCHEMA_CRDS)
RELEASE, NAMESPACE = "cohort-check", "cohort-check"
CUSTOM_GROUPS = ("cohort.dev/",)  # our custom resources: no schema in kubernetes-validate
counts = Counter()


def validate_docs(docs, source, errors):
    """Strict schema validation of parsed objects; returns nothing, appends to errors."""
    seen = set()
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"{source}: not a Kubernetes object: {str(doc)[:80]!r}")
            continue
        name = (doc.get("metadata") or {}).get("name")
        what = f"{source}: {doc['kind']}/{name}"
        if not name:
            errors.append(f"{what}: metadata.name is missing")
            continue
        key = (doc["apiVersion"].split("/")[0], doc["kind"], name)
        if key in seen:
            errors.append(f"{what}: rendered twice")
        seen.add(key)
        for problem in container_problems(doc):
            errors.append(f"{what}: {problem}")
        schema = OPERATOR_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            problems = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for e in problems:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{what}: invalid against its CRD (scripts/schemas) at {path or '(root)'}: {e.message}")
            counts["operator resources valid"] += not problems
            continue
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
            counts["manifests"] += 1
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{what}: invalid against Kubernetes {e.version} at {path or '(root)'}: {e.message}")
        except kv.SchemaNotFoundError as e:
            if doc["apiVersion"].startswith(CUSTOM_GROUPS):
                counts["custom resources skipped"] += 1
            else:
                errors.append(f"{what}: {e.message}")


def container_problems(doc):
    """What the schemas cannot see: duplicate env names or mounts in one container."""
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for field, key in (("env", "name"), ("volumeMounts", "mountPath"), ("ports", "name")):
            names = [item.get(key) for item in c.get(field) or []]
            for dup in sorted({n for n in names if names.count(n) > 1}):
                yield f"container {c.get('name')}: {field} has {dup!r} twice"
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                yield f"container {c.get('name')}: mount {m.get('name')!r} has no volume"


def check_render(chart_dir, values, label, errors, expect_refusal=None):
    """Render + validate. With expect_refusal (a substring), the render must fail with it."""
    with helm.Chart.load(chart_dir) as chart:
        try:
            rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as e:
            message = str(e).strip()
            if expect_refusal is not None and expect_refusal in message:
                counts["refusals as expected"] += 1
                return
            errors.append(f"{label}: render failed: {message}")
            return
    if expect_refusal is not None:
        errors.append(f"{label}: rendered, but should have been refused ({expect_refusal!r})")
        return
    counts["renders"] += 1
    objects = sum(1 for p, t in rendered.items() if not p.endswith("NOTES.txt") and t.strip())
    if objects == 0:
        errors.append(f"{label}: rendered no manifests")
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            errors.append(f"{label}: {path}: not YAML: {e}")
            continue
        validate_docs(docs, f"{label}: {path}", errors)
        export_executor_configs(docs, label)
        for doc in docs:
            labels = ((doc or {}).get("metadata") or {}).get("labels") or {}
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and "grafana_dashboard" in labels:
                for key, text in sorted((doc.get("data") or {}).items()):
                    check_dashboard(text, f"{label}: {path}: {key}", errors)
                    counts["dashboards rendered"] += 1


def check_dashboard(text, source, errors):
    """A Grafana dashboard: JSON, with a uid and a title, and a PromQL expr in every query."""
    import json
    try:
        dash = json.loads(text)
    except ValueError as e:
        errors.append(f"{source}: not JSON: {e}")
        return
    if not isinstance(dash, dict) or not dash.get("uid") or not dash.get("title"):
        errors.append(f"{source}: a dashboard needs a uid and a title")
        return
    panels = [p for p in dash.get("panels") or [] if p.get("type") != "row"]
    if not panels:
        errors.append(f"{source}: no panels")
    for p in panels:
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{source}: panel {p.get('title')!r} has no queries")
        for t in targets:
            if not str(t.get("expr") or "").strip():
                errors.append(f"{source}: panel {p.get('title')!r} has a query without an expr")


def check_dashboard_files(chart_dir, errors):
    for path in sorted(glob.glob(os.path.join(chart_dir, "dashboards", "*.json"))):
        with open(path) as f:
            check_dashboard(f.read(), os.path.relpath(path, os.path.dirname(chart_dir)), errors)
        counts["dashboard files"] += 1


def export_executor_configs(docs, label):
    """Writes each rendered executor-pod.json to $COHORT_CHART_RENDERS (when set), where a
    Rust test (libs/kube/tests/chart_contract.rs) loads it as task-manager would."""
    out = os.environ.get("COHORT_CHART_RENDERS")
    if not out or "bad-" in label:
        return
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            text = (doc.get("data") or {}).get("executor-pod.json")
            if text is not None:
                os.makedirs(out, exist_ok=True)
                name = re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")
                with open(os.path.join(out, f"{name}.executor-pod.json"), "w") as f:
                    f.write(text)


def check_lint(chart_dir, values, label, errors):
    report = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE,
                       kube_version="v" + KUBE_VERSION.lstrip("v"))
    counts["lints"] += 1
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:  # 2 warning, 3 error (strict: warnings fail too)
            errors.append(f"{label}: lint {m.get('path')}: {m.get('error', '').strip()}")
    for e in report.get("errors", []):
        if not any(e.strip() in (m.get("error") or "") for m in report.get("messages", [])):
            errors.append(f"{label}: lint: {e.strip()}")


def check_crds(chart_dir, errors):
    with helm.Chart.load(chart_dir) as chart:
        crds = chart.crds
    for crd in crds:
        label = crd.get("filename") or crd.get("name")
        try:
            docs = list(yaml.safe_load_all(crd["data"]))
        except yaml.YAMLError as e:
            errors.append(f"{label}: not YAML: {e}")
            continue
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") != "CustomResourceDefinition":
                errors.append(f"{label}: crds/ holds a {doc.get('kind')}, not a CustomResourceDefinition")
        before = counts["manifests"]
        validate_docs(docs, label, errors)
        counts["crds"] += counts["manifests"] - before


def load_values(path):
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: values must be a mapping")
    return values


def check_chart(chart_dir, errors):
    name = os.path.basename(os.path.normpath(chart_dir))
    ci_files = sorted(glob.glob(os.path.join(chart_dir, "ci", "*.yaml")))
    minimal = os.path.join(chart_dir, "ci", "minimal-values.yaml")
    counts["charts"] += 1
    check_crds(chart_dir, errors)
    check_dashboard_files(chart_dir, errors)
    if os.path.exists(minimal):
        # Declares required values: bare defaults must be refused, naming what is missing.
        check_render(chart_dir, None, f"{name} (defaults)", errors, expect_refusal="is required")
    else:
        check_render(chart_dir, None, f"{name} (defaults)", errors)
        check_lint(chart_dir, None, f"{name} (defaults)", errors)
    counts["value files"] += 1
    for path in ci_files:
        label = f"{name} ({os.path.relpath(path, chart_dir)})"
        values = load_values(path)
        check_render(chart_dir, values, label, errors)
        check_lint(chart_dir, values, label, errors)
        counts["value files"] += 1


def self_check(charts):
    """Bad values must make the check fail: otherwise the checker proves nothing."""
    by_name = {os.path.basename(os.path.normpath(c)): c for c in charts}
    cases = []
    if "cohort-server" in by_name:
        cases += [
            ("cohort-server", {"proxy": {"service": {"type": "Bogus"}}}, "service type outside the enum"),
            ("cohort-server", {"blob": {"type": "s3"}}, "s3 without a bucket"),
            ("cohort-server", {"podAnnotations": {"cohort.dev/replicas": 3}}, "an integer annotation (schema-valid values, invalid manifest)"),
            ("cohort-server", {"metrics": {"enabled": True, "serviceMonitor": {"enabled": True, "interval": "30 seconds"}}},
             "a ServiceMonitor interval its CRD refuses"),
            ("cohort-server", {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}, "a ServiceMonitor without metrics"),
        ]
    if "cohort-client" in by_name:
        minimal = load_values(os.path.join(by_name["cohort-client"], "ci", "minimal-values.yaml"))
        no_party = copy.deepcopy(minimal)
        no_party["party"].pop("name", None)
        bad_volume = copy.deepcopy(minimal)
        bad_volume["datasets"] = {"volumes": [{"name": "d", "mountPath": "/d", "hostPath": {"path": "/srv", "kind": "Directory"}}]}
        gpu_in_resources = copy.deepcopy(minimal)
        gpu_in_resources["executor"] = {"launcher": "kubernetes", "resources": {"limits": {"nvidia.com/gpu": 1}}}
        bad_namespace = copy.deepcopy(minimal)
        bad_namespace["acceptNamespaces"] = ["Team_A"]
        no_cohort = copy.deepcopy(minimal)
        no_cohort["minCohort"] = 0
        cases += [
            ("cohort-client", no_party, "party.name missing"),
            ("cohort-client", bad_namespace, "an accepted namespace that is not a DNS label"),
            ("cohort-client", no_cohort, "minCohort 0"),
            ("cohort-client", gpu_in_resources, "GPUs in executor.resources instead of executor.gpus"),
            ("cohort-client", bad_volume, "an unknown field in a hostPath volume"),
        ]
    with tempfile.TemporaryDirectory(prefix="cohort-charts-bad-") as tmp:
        for i, (chart, values, why) in enumerate(cases):
            path = os.path.join(tmp, f"bad-{i}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(values, f)
            errors = []
            saved = counts.copy()
            check_render(by_name[chart], load_values(path), f"{chart} ({os.path.basename(path)})", errors)
            counts.clear()
            counts.update(saved)
            if not errors:
                print(f"SELF-CHECK FAILED: {chart} with {why} passed the check", file=sys.stderr)
                return False
            reason = " ".join(errors[0].split()).split(": ", 1)[-1]
            print(f"  self-check: {chart} with {why}: refused ({reason[:200]})")
            counts["self-checks"] += 1
    return True


def check_schema_crds(errors):
    """The trimmed operator CRDs are CRDs Kubernetes would accept."""
    for path in SCHEMA_CRDS:
        with open(path) as f:
            validate_docs(list(yaml.safe_load_all(f)), os.path.relpath(path, ROOT), errors)


def main():
    charts = sys.argv[1:]
    errors = []
    check_schema_crds(errors)
    for chart_dir in charts:
        check_chart(chart_dir, errors)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    ok = self_check(charts)
    print(
        f"check-charts: {counts['charts']} charts, {counts['value files']} value sets, "
        f"{counts['renders']} renders, {counts['lints']} lints, "
        f"{counts['manifests']} manifests valid against Kubernetes {KUBE_VERSION} (strict; "
        f"{counts['crds']} CRDs), {counts['operator resources valid']} operator resources valid "
        f"against scripts/schemas, {counts['custom resources skipped']} custom resources skipped, "
        f"{counts['refusals as expected']} refusals as expected, "
        f"{counts['self-checks']} bad value sets refused, "
        f"{counts['dashboard files']} dashboard files and {counts['dashboards rendered']} rendered dashboards parsed; "
        f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}"
    )
    if errors or not ok:
        print(f"check-charts: FAILED ({len(errors)} problems)", file=sys.stderr)
        sys.exit(1)


main()
PY
