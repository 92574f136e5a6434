//! The manifest directory source: Services, EndpointSlices, Endpoints and
//! Nodes as YAML or JSON files (multi-document, `kind: List`, any file name,
//! subfolders included, dot-files skipped as ConfigMap mounts need).
//! Other kinds (Deployments in the same file, as tutorials have) are ignored.
//! A file that does not parse is reported by name and skipped; its last good
//! content is not kept, so what the folder says is what is programmed.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use crate::agent::{
    model::{ObjKey, Objects},
    slice::Slice,
};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{file}: {reason}")]
pub struct FileError {
    pub file: String,
    pub reason: String,
}

/// Objects read from one file.
#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    pub services: Vec<Arc<Service>>,
    /// Kept as the agent keeps them, by key (see `agent::slice`).
    pub slices: Vec<(ObjKey, Arc<Slice>)>,
    pub endpoints: Vec<Arc<Endpoints>>,
    pub nodes: Vec<Node>,
    /// Objects in this file that could not be read; the rest still count.
    pub errors: Vec<FileError>,
}

fn object_name(v: &serde_yaml::Value) -> String {
    let meta = v.get("metadata");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>");
    format!("{ns}/{name}")
}

/// Parses the text of one manifest file.
pub fn parse(file: &str, text: &str) -> FileObjects {
    let mut out = FileObjects::default();
    // Each document is turned into objects before the next is parsed, so
    // only one document's generic tree is in memory at a time.
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => objects(file, vec![v], &mut out),
            Err(e) => {
                out.errors.push(FileError {
                    file: file.into(),
                    reason: format!("document {}: {e}", i + 1),
                });
                // The rest of a broken stream cannot be trusted to split
                // into the same documents.
                break;
            }
        }
    }
    out
}

/// Objects of one document (a `List`'s items in order).
fn objects(file: &str, mut docs: Vec<serde_yaml::Value>, out: &mut FileObjects) {
    while let Some(v) = docs.pop() {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let err = |e: String| FileError {
            file: file.into(),
            reason: format!("{kind} {}: {e}", object_name(&v)),
        };
        let r = match kind.as_str() {
            "List" | "ServiceList" | "EndpointSliceList" | "EndpointsList" | "NodeList" => {
                if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                    let item_kind = kind.strip_suffix("List").unwrap_or("");
                    for item in items.iter().rev() {
                        let mut item = item.clone();
                        if let (Some(m), false) = (item.as_mapping_mut(), item_kind.is_empty()) {
                            m.entry("kind".into()).or_insert(item_kind.into());
                        }
                        docs.push(item);
                    }
                }
                Ok(())
            }
            "Service" => serde_yaml::from_value(v.clone()).map(|o| out.services.push(Arc::new(o))),
            "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(v.clone()).map(|o| {
                out.slices
                    .push((ObjKey::of(&o.metadata), Arc::new(Slice::from(&o))))
            }),
            "Endpoints" => {
                serde_yaml::from_value(v.clone()).map(|o| out.endpoints.push(Arc::new(o)))
            }
            "Node" => serde_yaml::from_value(v.clone()).map(|o| out.nodes.push(o)),
            _ => Ok(()),
        };
        if let Err(e) = r {
            out.errors.push(err(e.to_string()));
        }
    }
}

/// Adds one file's objects into `objs`. Objects without a namespace are in
/// `default`, as `kubectl apply` would put them.
pub fn merge(objs: &mut Objects, nodes: &mut BTreeMap<String, Node>, f: &FileObjects) {
    let key = ObjKey::of;
    for s in &f.services {
        objs.services.insert(key(&s.metadata), s.clone());
    }
    for (k, s) in &f.slices {
        objs.slices.insert(k.clone(), s.clone());
    }
    for e in &f.endpoints {
        objs.endpoints.insert(key(&e.metadata), e.clone());
    }
    for n in &f.nodes {
        nodes.insert(n.metadata.name.clone().unwrap_or_default(), n.clone());
    }
}

/// What identifies a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// A watched folder: re-reads only files whose stamp changed.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, (Stamp, FileObjects)>,
    polled: bool,
}

/// Everything the folder says now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub objects: Objects,
    pub nodes: BTreeMap<String, Node>,
    pub errors: Vec<FileError>,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
            polled: false,
        }
    }

    /// Rescans the folder. Returns a snapshot when anything changed since
    /// the last call (always on the first).
    pub fn poll(&mut self) -> Result<Option<Snapshot>, FileError> {
        let mut seen = BTreeMap::new();
        walk(&self.root, &mut seen).map_err(|e| FileError {
            file: self.root.display().to_string(),
            reason: e.to_string(),
        })?;
        let first = !self.polled;
        self.polled = true;
        let mut changed = seen.len() != self.files.len();
        let mut next = BTreeMap::new();
        for (path, stamp) in seen {
            match self.files.remove(&path) {
                Some((old, objs)) if old == stamp => {
                    next.insert(path, (stamp, objs));
                }
                _ => {
                    changed = true;
                    let name = path.display().to_string();
                    let objs = match fs::read_to_string(&path) {
                        Ok(text) => parse(&name, &text),
                        Err(e) => FileObjects {
                            errors: vec![FileError {
                                file: name,
                                reason: e.to_string(),
                            }],
                            ..Default::default()
                        },
                    };
                    next.insert(path, (stamp, objs));
                }
            }
        }
        changed |= !self.files.is_empty(); // files that disappeared
        self.files = next;
        if !(changed || first) {
            return Ok(None);
        }
        let mut snap = Snapshot::default();
        for (_, objs) in self.files.values() {
            merge(&mut snap.objects, &mut snap.nodes, objs);
            snap.errors.extend(objs.errors.iter().cloned());
        }
        Ok(Some(snap))
    }
}

fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Stamp>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks, as ConfigMap volumes are made of them.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, out)?;
        } else if meta.is_file() {
            // Any name but editor backups; YAML reads JSON too.
            if !name.to_string_lossy().ends_with('~') {
                let stamp = Stamp {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                    ino: meta.ino(),
                };
                out.insert(path, stamp);
            }
        }
    }
    Ok(())
}
