//! The patch formats the API server accepts: JSON merge patch (RFC 7386),
//! JSON patch (RFC 6902), and strategic merge patch and server-side apply
//! approximated as merge patches (enough for objects without lists merged
//! by key; see the crate docs).

use serde_json::Value;

/// RFC 7386: objects merge recursively, `null` removes, anything else
/// replaces.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Splits a JSON pointer into its parent pointer and last token.
fn parent(path: &str) -> Result<(&str, String), String> {
    let i = path
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((&path[..i], unescape(&path[i + 1..])))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent_path, last) = parent(path)?;
    match doc.pointer_mut(parent_path) {
        Some(Value::Object(o)) => {
            o.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i > a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("path {parent_path:?} does not exist")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent_path, last) = parent(path)?;
    match doc.pointer_mut(parent_path) {
        Some(Value::Object(o)) => o
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Some(Value::Array(a)) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path {parent_path:?} does not exist")),
    }
}

/// Why a JSON patch was refused: a failed `test` is a conflict in the
/// API server's terms (422 Invalid there, too), anything else a bad request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonPatchError {
    TestFailed(String),
    Invalid(String),
}

/// RFC 6902, applied to a copy: all operations or none.
pub(crate) fn json_patch(doc: &Value, ops: &Value) -> Result<Value, JsonPatchError> {
    let Value::Array(ops) = ops else {
        return Err(JsonPatchError::Invalid(
            "a JSON patch is an array of operations".into(),
        ));
    };
    let mut doc = doc.clone();
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Invalid("operation without a path".into()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::Invalid(format!("{kind} {path}: no value")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError::Invalid(format!("{kind} {path}: no from")))
        };
        match kind {
            "add" => add(&mut doc, path, value()?).map_err(JsonPatchError::Invalid)?,
            "remove" => {
                remove(&mut doc, path).map_err(JsonPatchError::Invalid)?;
            }
            "replace" => {
                if doc.pointer(path).is_none() {
                    return Err(JsonPatchError::Invalid(format!(
                        "replace {path}: does not exist"
                    )));
                }
                if let Some(slot) = doc.pointer_mut(path) {
                    *slot = value()?;
                }
            }
            "test" => {
                let want = value()?;
                if doc.pointer(path) != Some(&want) {
                    return Err(JsonPatchError::TestFailed(format!(
                        "test {path}: value is not {want}"
                    )));
                }
            }
            "move" => {
                let v = remove(&mut doc, from()?).map_err(JsonPatchError::Invalid)?;
                add(&mut doc, path, v).map_err(JsonPatchError::Invalid)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| JsonPatchError::Invalid(format!("copy {path}: no source")))?;
                add(&mut doc, path, v).map_err(JsonPatchError::Invalid)?;
            }
            other => {
                return Err(JsonPatchError::Invalid(format!(
                    "unknown operation {other:?}"
                )));
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patches() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut doc, &json!({"a": null, "b": {"c": 4}, "e": [1]}));
        assert_eq!(doc, json!({"b": {"c": 4, "d": 3}, "e": [1]}));
    }

    #[test]
    fn json_patches() {
        let doc = json!({"spec": {"owners": ["a"]}, "metadata": {"resourceVersion": "5"}});
        let out = json_patch(
            &doc,
            &json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                {"op": "add", "path": "/spec/owners/-", "value": "b"},
                {"op": "replace", "path": "/spec/owners/0", "value": "c"},
            ]),
        )
        .expect("applies");
        assert_eq!(out["spec"]["owners"], json!(["c", "b"]));
        let err = json_patch(
            &doc,
            &json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "4"}]),
        );
        assert!(matches!(err, Err(JsonPatchError::TestFailed(_))));
        assert!(json_patch(&doc, &json!([{"op": "remove", "path": "/x"}])).is_err());
    }
}
