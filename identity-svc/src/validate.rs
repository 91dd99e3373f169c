//! What clients may send.
//!
//! Label keys are `source:name`. The source says where a label came from
//! (`k8s` for Kubernetes labels, as [`weft_common::labels::security_labels`]
//! produces them); `reserved` is refused because the reserved identities are
//! built in. Names and values follow Kubernetes' label syntax, which also
//! keeps out `;` and `=`, the separators of
//! [`weft_common::labels::canonical_key`]: two different sets can never share
//! a key.

use std::collections::BTreeMap;

/// The most labels one set may carry.
pub const MAX_LABELS: usize = 256;
/// The longest label source (a DNS label).
pub const MAX_SOURCE_LEN: usize = 63;
/// The longest label name: a 253-character DNS prefix, `/`, 63 characters.
pub const MAX_NAME_LEN: usize = 317;
/// The longest label value, as in Kubernetes.
pub const MAX_VALUE_LEN: usize = 63;
/// The longest owner.
pub const MAX_OWNER_LEN: usize = 512;

/// Checks a client's label set; the error names the offending field.
pub fn labels(raw: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, String> {
    if raw.is_empty() {
        return Err("labels: must not be empty".into());
    }
    if raw.len() > MAX_LABELS {
        return Err(format!(
            "labels: {} labels, at most {MAX_LABELS} allowed",
            raw.len()
        ));
    }
    let mut out = BTreeMap::new();
    for (key, value) in raw {
        check_label(&key, &value)?;
        out.insert(key, value);
    }
    Ok(out)
}

fn check_label(key: &str, value: &str) -> Result<(), String> {
    let Some((source, name)) = key.split_once(':') else {
        return Err(format!(
            "labels[{key:?}]: key needs a source prefix, e.g. \"k8s:{key}\""
        ));
    };
    if source.is_empty()
        || source.len() > MAX_SOURCE_LEN
        || !source
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "labels[{key:?}]: source {source:?} must be 1-{MAX_SOURCE_LEN} lowercase letters, digits or '-'"
        ));
    }
    if source == "reserved" {
        return Err(format!(
            "labels[{key:?}]: the \"reserved\" source belongs to the built-in identities"
        ));
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(name_char) {
        return Err(format!(
            "labels[{key:?}]: name {name:?} must be 1-{MAX_NAME_LEN} characters of letters, digits, '.', '_', '-' and '/'"
        ));
    }
    if value.len() > MAX_VALUE_LEN || !value.chars().all(value_char) {
        return Err(format!(
            "labels[{key:?}]: value {value:?} must be at most {MAX_VALUE_LEN} characters of letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks an owner; `required` for Release, where an empty owner is an error.
pub fn owner(owner: &str, required: bool) -> Result<(), String> {
    if owner.is_empty() {
        return if required {
            Err("owner: must not be empty".into())
        } else {
            Ok(())
        };
    }
    if owner.len() > MAX_OWNER_LEN || owner.chars().any(char::is_control) {
        return Err(format!(
            "owner: at most {MAX_OWNER_LEN} characters, no control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::labels::security_labels;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pod_label_sets_are_accepted() {
        let pod = security_labels(
            "team-a",
            &set(&[("app", "web"), ("app.kubernetes.io/name", "shop")]),
            &set(&[("kubernetes.io/metadata.name", "team-a")]),
        );
        let raw: BTreeMap<String, String> = pod.clone().into_iter().collect();
        assert_eq!(labels(raw), Ok(pod));
    }

    #[test]
    fn bad_labels_name_the_key() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (&[], "labels: must not be empty"),
            (
                &[("app", "web")],
                "labels[\"app\"]: key needs a source prefix",
            ),
            (&[("reserved:host", "")], "\"reserved\" source"),
            (&[("K8S:app", "web")], "source \"K8S\""),
            (&[("k8s:", "web")], "name \"\""),
            (&[("k8s:a=b", "c")], "name \"a=b\""),
            (&[("k8s:a", "b;c")], "value \"b;c\""),
        ];
        for (pairs, want) in cases {
            let err = labels(set(pairs)).expect_err("refused");
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn owners() {
        assert!(owner("", false).is_ok());
        assert_eq!(owner("", true), Err("owner: must not be empty".into()));
        assert!(owner("pod:default/web-0", true).is_ok());
        assert!(owner("a\nb", true).is_err());
    }
}
