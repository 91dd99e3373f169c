//! The lab's manifest directory: the stand-in for the Kubernetes API that
//! svc-watcher watches. The lab reads it like kubelet and the endpoints
//! controller read the API, and writes back what they would write (pod
//! status, EndpointSlices, allocated cluster IPs). Every write replaces a
//! file atomically (temp file + rename), so a reader never sees half of one.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{Serialize, de::DeserializeOwned};

/// Where an object came from: the file and its index among the file's documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    pub doc: usize,
}

#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub pods: Vec<(Origin, Pod)>,
    pub services: Vec<(Origin, Service)>,
    pub namespaces: Vec<(Origin, Namespace)>,
    pub nodes: Vec<(Origin, Node)>,
    pub slices: Vec<(Origin, EndpointSlice)>,
}

#[derive(Debug, Clone)]
pub struct ManifestDir {
    root: PathBuf,
}

fn is_manifest(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    !name.starts_with('.')
        && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
}

impl ManifestDir {
    pub fn new(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        files
    }

    /// A cheap fingerprint of the directory: changes when any file does.
    pub fn fingerprint(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        self.files()
            .into_iter()
            .filter_map(|p| {
                let m = fs::metadata(&p).ok()?;
                Some((p, m.len(), m.modified().ok()?))
            })
            .collect()
    }

    /// Every object the lab cares about. Files that do not parse are
    /// skipped (svc-watcher reports them too).
    pub fn read(&self) -> Objects {
        let mut out = Objects::default();
        for path in self.files() {
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            for (doc, value) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let Ok(value) = serde_yaml::Value::deserialize(value) else {
                    break;
                };
                let origin = Origin {
                    path: path.clone(),
                    doc,
                };
                let kind = value
                    .get("kind")
                    .and_then(|k| k.as_str())
                    .unwrap_or_default()
                    .to_string();
                fn typed<T: DeserializeOwned>(v: serde_yaml::Value) -> Option<T> {
                    serde_yaml::from_value(v).ok()
                }
                match kind.as_str() {
                    "Pod" => out.pods.extend(typed(value).map(|o| (origin, o))),
                    "Service" => out.services.extend(typed(value).map(|o| (origin, o))),
                    "Namespace" => out.namespaces.extend(typed(value).map(|o| (origin, o))),
                    "Node" => out.nodes.extend(typed(value).map(|o| (origin, o))),
                    "EndpointSlice" => out.slices.extend(typed(value).map(|o| (origin, o))),
                    _ => {}
                }
            }
        }
        out
    }

    /// The file the lab uses for an object it creates.
    pub fn path_for(&self, kind: &str, namespace: &str, name: &str) -> PathBuf {
        let file = if namespace.is_empty() {
            format!("{}-{name}.yaml", kind.to_lowercase())
        } else {
            format!("{}-{namespace}-{name}.yaml", kind.to_lowercase())
        };
        self.root.join(file)
    }

    /// Writes one object as the only document of `path`.
    pub fn write<T: Serialize>(&self, path: &Path, object: &T) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(object)?;
        write_atomic(path, &text)
    }

    /// Replaces document `origin.doc` of `origin.path` with `object`, keeping
    /// the file's other documents as they are.
    pub fn replace<T: Serialize>(&self, origin: &Origin, object: &T) -> anyhow::Result<()> {
        let text = fs::read_to_string(&origin.path)
            .with_context(|| format!("reading {}", origin.path.display()))?;
        let mut docs: Vec<serde_yaml::Value> = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde_yaml::Value::deserialize(d)?);
        }
        let new = serde_yaml::to_value(object)?;
        match docs.get_mut(origin.doc) {
            Some(slot) => *slot = new,
            None => docs.push(new),
        }
        let joined = docs
            .iter()
            .map(serde_yaml::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        write_atomic(&origin.path, &joined)
    }

    /// Removes document `origin.doc`; the file goes when it was the last.
    pub fn remove(&self, origin: &Origin) -> anyhow::Result<()> {
        let text = match fs::read_to_string(&origin.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut docs: Vec<serde_yaml::Value> = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde_yaml::Value::deserialize(d)?);
        }
        if origin.doc < docs.len() {
            docs.remove(origin.doc);
        }
        if docs.is_empty() {
            fs::remove_file(&origin.path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            return Ok(());
        }
        let joined = docs
            .iter()
            .map(serde_yaml::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        write_atomic(&origin.path, &joined)
    }

    /// Writes raw YAML (one or more documents) as a new file.
    pub fn apply_yaml(&self, file_name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.root.join(file_name);
        write_atomic(&path, yaml)?;
        Ok(path)
    }
}

use serde::Deserialize as _;

fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}
