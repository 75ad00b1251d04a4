//! Checks that a CRD schema is *structural* in the sense of `apiextensions.k8s.io/v1`
//! (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>),
//! so a generated CRD is refused here, in a test, rather than by an API server.

use serde_json::Value;

/// Keywords a value validation inside `oneOf`/`anyOf`/`allOf`/`not` must not set.
const FORBIDDEN_IN_XOF: &[&str] = &[
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
];
const XOF: &[&str] = &["oneOf", "anyOf", "allOf"];

/// Every way `schema` (an `openAPIV3Schema`, as JSON) breaks the structural-schema rules,
/// each as `path: problem`. Empty means structural. Checked: no `$ref` (nor `definitions`),
/// a `type` on every node outside `x-of` unless `x-kubernetes-int-or-string` or
/// `x-kubernetes-preserve-unknown-fields` stands in for it, `items` on every array,
/// `properties` and `additionalProperties` never together, and inside `x-of` no `type`,
/// `description`, `default`, `additionalProperties` or `nullable`, and no property that the
/// enclosing node does not declare.
pub fn structural_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check(schema, "openAPIV3Schema", false, &mut problems);
    problems
}

fn check(node: &Value, path: &str, in_xof: bool, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: is not a schema object"));
        return;
    };
    for key in ["$ref", "definitions", "$defs", "$schema", "const"] {
        if obj.contains_key(key) {
            problems.push(format!("{path}: has {key}"));
        }
    }
    let marker = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    let ty = obj.get("type").and_then(Value::as_str);
    if in_xof {
        for key in FORBIDDEN_IN_XOF {
            if obj.contains_key(*key) {
                problems.push(format!("{path}: sets {key} inside oneOf/anyOf/allOf/not"));
            }
        }
    } else if ty.is_none()
        && !marker("x-kubernetes-int-or-string")
        && !marker("x-kubernetes-preserve-unknown-fields")
    {
        problems.push(format!(
            "{path}: has no type (nor an x-kubernetes-int-or-string / preserve-unknown-fields marker)"
        ));
    }
    if ty == Some("array") && !obj.contains_key("items") {
        problems.push(format!("{path}: is an array without items"));
    }
    let properties = obj.get("properties").and_then(Value::as_object);
    if properties.is_some() && obj.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: sets both properties and additionalProperties"
        ));
    }
    if let Some(properties) = properties {
        for (name, sub) in properties {
            check(sub, &format!("{path}.properties.{name}"), in_xof, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check(items, &format!("{path}.items"), in_xof, problems);
    }
    if let Some(extra) = obj.get("additionalProperties")
        && extra.is_object()
    {
        check(
            extra,
            &format!("{path}.additionalProperties"),
            in_xof,
            problems,
        );
    }
    let mut branches: Vec<(String, &Value)> = Vec::new();
    for key in XOF {
        if let Some(list) = obj.get(*key).and_then(Value::as_array) {
            for (i, b) in list.iter().enumerate() {
                branches.push((format!("{path}.{key}[{i}]"), b));
            }
        }
    }
    if let Some(not) = obj.get("not") {
        branches.push((format!("{path}.not"), not));
    }
    for (branch_path, branch) in branches {
        check(branch, &branch_path, true, problems);
        if let Some(names) = branch.get("properties").and_then(Value::as_object) {
            for name in names.keys() {
                if !properties.is_some_and(|p| p.contains_key(name)) {
                    problems.push(format!(
                        "{branch_path}: property {name} is not declared outside oneOf/anyOf/allOf/not"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_what_the_api_server_refuses() {
        let bad = json!({
            "type": "object",
            "properties": {
                "a": {"$ref": "#/definitions/A"},
                "b": {"properties": {}},
                "c": {"type": "array"},
                "d": {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": false},
                "e": {"type": "object", "properties": {"k": {"type": "string"}},
                      "oneOf": [{"type": "object", "properties": {"k": {}, "z": {}}}]}
            }
        });
        let p = structural_problems(&bad);
        let has = |s: &str| p.iter().any(|x| x.contains(s));
        assert!(has("properties.a: has $ref"), "{p:?}");
        assert!(has("properties.b: has no type"), "{p:?}");
        assert!(has("properties.c: is an array without items"), "{p:?}");
        assert!(has("properties.d: sets both"), "{p:?}");
        assert!(has("oneOf[0]: sets type"), "{p:?}");
        assert!(has("property z is not declared"), "{p:?}");
    }

    #[test]
    fn accepts_markers_and_plain_types() {
        let good = json!({
            "type": "object",
            "required": ["t"],
            "properties": {
                "t": {"x-kubernetes-int-or-string": true},
                "m": {"type": "object", "additionalProperties": {"type": "string"}},
                "l": {"type": "array", "items": {"type": "integer"}},
                "u": {"type": "object", "properties": {"k": {"type": "string"}},
                      "oneOf": [{"required": ["k"]}, {"properties": {"k": {"enum": ["a"]}}}]}
            }
        });
        assert_eq!(structural_problems(&good), Vec::<String>::new());
    }
}
