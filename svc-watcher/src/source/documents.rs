//! Manifest file contents → converted objects.
//!
//! A file holds one or more YAML documents (or one JSON document); a
//! document is an object, or a `List` (`kind: List`, or a typed list such as
//! `ServiceList`) whose `items` are objects. Kinds the watcher does not
//! serve are skipped. The outcome separates what cannot be read at all (the
//! file is not YAML/JSON: a [`ParseError`], and the caller keeps what the
//! file gave before) from single objects that are refused ([`Invalid`],
//! while the rest of the file flows).

use serde::de::DeserializeOwned;
use serde_json::Value;
use weft_common::watch::ObjKey;
use weft_proto::watcher::v1::{Kind, Resource};

use crate::convert::{self, ConvertError, Reason};

/// How to read a file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

/// The file as a whole is not YAML or JSON.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One refused object.
#[derive(Debug, Clone)]
pub struct Invalid {
    /// The Kubernetes kind, for the metric label.
    pub kind: &'static str,
    /// The object's identity when its kind and name could be read, so the
    /// caller can keep the version stored before.
    pub key: Option<ObjKey>,
    /// 1-based document number within the file.
    pub document: usize,
    pub error: ConvertError,
}

/// What a file contributes.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub objects: Vec<Resource>,
    pub invalid: Vec<Invalid>,
    /// Objects of kinds the watcher does not serve.
    pub ignored: usize,
}

/// Reads every document of a file.
pub fn parse(bytes: &[u8], format: Format) -> Result<Parsed, ParseError> {
    let documents: Vec<Value> = match format {
        Format::Json => vec![serde_json::from_slice(bytes)?],
        Format::Yaml => {
            let mut docs = Vec::new();
            for doc in serde_yaml::Deserializer::from_slice(bytes) {
                docs.push(<Value as serde::Deserialize>::deserialize(doc)?);
            }
            docs
        }
    };
    let mut parsed = Parsed::default();
    for (i, doc) in documents.into_iter().enumerate() {
        collect(doc, i + 1, &mut parsed);
    }
    Ok(parsed)
}

fn collect(doc: Value, document: usize, out: &mut Parsed) {
    let mut object = match doc {
        // An empty document (a trailing `---`) is nothing, not an error.
        Value::Null => return,
        Value::Object(o) => o,
        _ => {
            out.invalid.push(Invalid {
                kind: "Unknown",
                key: None,
                document,
                error: ConvertError::new("", Reason::Decode, "the document is not an object"),
            });
            return;
        }
    };
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();

    if let Some(item_kind) = kind.strip_suffix("List") {
        let Some(Value::Array(items)) = object.remove("items") else {
            out.invalid.push(Invalid {
                kind: "List",
                key: None,
                document,
                error: ConvertError::new("items", Reason::Decode, "a list needs an items array"),
            });
            return;
        };
        for mut item in items {
            // Typed lists (`ServiceList`) leave kind and apiVersion off
            // their items; a generic `List` names them per item.
            if let Value::Object(o) = &mut item
                && !item_kind.is_empty()
            {
                o.entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_string()));
                o.entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.clone()));
            }
            collect(item, document, out);
        }
        return;
    }

    let object = Value::Object(object);
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => decode(object, Kind::Service, true, convert::service),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            decode(object, Kind::EndpointSlice, true, convert::endpoint_slice)
        }
        ("v1", "Pod") => decode(object, Kind::Pod, true, convert::pod),
        ("v1", "Node") => decode(object, Kind::Node, false, convert::node),
        ("v1", "Namespace") => decode(object, Kind::Namespace, false, convert::namespace),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            decode(object, Kind::NetworkPolicy, true, convert::network_policy)
        }
        _ => {
            tracing::debug!(
                api_version,
                kind,
                document,
                "ignoring an object of a kind not served"
            );
            out.ignored += 1;
            return;
        }
    };
    match result {
        Ok(resource) => out.objects.push(resource),
        Err((kind, key, error)) => out.invalid.push(Invalid {
            kind: convert::kind_name(kind),
            key,
            document,
            error,
        }),
    }
}

type Refused = (Kind, Option<ObjKey>, ConvertError);

fn decode<T: DeserializeOwned>(
    object: Value,
    kind: Kind,
    namespaced: bool,
    convert: fn(&T) -> Result<Resource, ConvertError>,
) -> Result<Resource, Refused> {
    let key = key_of(&object, kind, namespaced);
    let typed: T = serde_json::from_value(object).map_err(|e| {
        (
            kind,
            key.clone(),
            ConvertError::new("", Reason::Decode, e.to_string()),
        )
    })?;
    convert(&typed).map_err(|e| (kind, key, e))
}

/// The identity of an object that may not convert, read loosely.
fn key_of(object: &Value, kind: Kind, namespaced: bool) -> Option<ObjKey> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = if namespaced {
        meta.get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    } else {
        ""
    };
    Some(ObjKey::new(kind, namespace, name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys(p: &Parsed) -> Vec<String> {
        p.objects
            .iter()
            .map(|o| ObjKey::of(o).unwrap().to_string())
            .collect()
    }

    #[test]
    fn documents_lists_and_ignored_kinds() {
        let yaml = r#"
---
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a}
- metadata: {name: b, namespace: x}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: x}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}
---
apiVersion: v2
kind: Service
metadata: {name: future}
---
"#;
        let p = parse(yaml.as_bytes(), Format::Yaml).unwrap();
        assert_eq!(
            keys(&p),
            vec![
                "KIND_SERVICE/default/a",
                "KIND_SERVICE/x/b",
                "KIND_NAMESPACE/x"
            ]
        );
        assert_eq!(p.ignored, 2);
        assert!(p.invalid.is_empty());
    }

    #[test]
    fn refused_objects_keep_their_identity() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: "eighty"}]}
---
just a string
---
apiVersion: v1
kind: Node
metadata: {name: n, namespace: ignored}
spec: {podCIDR: 10.0.0.0}
"#;
        let p = parse(yaml.as_bytes(), Format::Yaml).unwrap();
        assert!(p.objects.is_empty());
        assert_eq!(p.invalid.len(), 3);
        assert_eq!(p.invalid[0].kind, "Service");
        assert_eq!(p.invalid[0].error.reason, Reason::Decode);
        assert_eq!(
            p.invalid[0].key,
            Some(ObjKey::new(Kind::Service, "shop", "web"))
        );
        assert_eq!(p.invalid[0].document, 1);
        assert_eq!(p.invalid[1].key, None);
        assert_eq!(p.invalid[2].key, Some(ObjKey::new(Kind::Node, "", "n")));
        assert_eq!(p.invalid[2].error.reason, Reason::Cidr);
    }

    #[test]
    fn unreadable_files_are_errors() {
        assert!(parse(b"a: [", Format::Yaml).is_err());
        assert!(parse(b"{", Format::Json).is_err());
        assert!(parse(&[0xff, 0xfe, 0x00], Format::Yaml).is_err());
        assert!(parse(b"", Format::Yaml).unwrap().objects.is_empty());
    }
}
