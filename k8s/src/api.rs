//! What an API answer means for an optimistic-concurrency loop.

use kube::api::ObjectMeta;

/// The HTTP status of an API error answer (`None` for transport errors).
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// A create found the name taken.
pub fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// A write carried a stale resourceVersion (or precondition).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason != "AlreadyExists")
}

pub fn is_not_found(e: &kube::Error) -> bool {
    status_code(e) == Some(404)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("object {name:?} has resourceVersion {value:?}, not an etcd revision")]
pub struct OpaqueVersion {
    pub name: String,
    pub value: String,
}

/// The object's resourceVersion as a number.
///
/// Kubernetes calls resourceVersions opaque, but every etcd-backed API
/// server hands out etcd revisions: one counter for all writes, so the
/// object created first has the smaller one. weft's stores rely on that to
/// agree, without a leader, on which of two racing claims came first; a
/// server that answers otherwise is refused rather than guessed about.
pub fn revision(meta: &ObjectMeta) -> Result<u64, OpaqueVersion> {
    let value = meta.resource_version.clone().unwrap_or_default();
    value.parse().map_err(|_| OpaqueVersion {
        name: meta.name.clone().unwrap_or_default(),
        value,
    })
}

/// A string usable as a label value: itself when it is one (at most 63
/// characters of `[A-Za-z0-9._-]`, alphanumeric at both ends), otherwise
/// `h-` and a stable hash. Labels only narrow list requests; readers
/// always compare the real field, so a hash collision costs nothing.
pub fn label_value(s: &str) -> String {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        s.to_string()
    } else {
        format!("h-{:016x}", fnv1a64(s.as_bytes()))
    }
}

/// FNV-1a, 64 bits: stable across builds and machines (unlike std's
/// `DefaultHasher`), which replicas of different versions need.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values() {
        assert_eq!(label_value("node-a"), "node-a");
        assert_eq!(label_value("a.b_c"), "a.b_c");
        let long = "n".repeat(64);
        assert!(label_value(&long).starts_with("h-"));
        assert_eq!(label_value(&long), label_value(&long));
        assert!(label_value("-x").starts_with("h-"));
        assert!(label_value("").starts_with("h-"));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn revisions() {
        let meta = ObjectMeta {
            name: Some("x".into()),
            resource_version: Some("42".into()),
            ..Default::default()
        };
        assert_eq!(revision(&meta), Ok(42));
        let bad = ObjectMeta {
            resource_version: Some("abc".into()),
            ..Default::default()
        };
        assert!(revision(&bad).is_err());
    }
}
