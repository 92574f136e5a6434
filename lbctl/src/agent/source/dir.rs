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
    svc::Svc,
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
    /// Kept as the agent keeps them, by key (see `agent::svc`).
    pub services: Vec<(ObjKey, Arc<Svc>)>,
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
    // Large files are parsed in parts, one per core: YAML parsing was most
    // of a 10,000-Service folder's start. A part is a run of whole
    // documents (a `---` line at column 0 always starts one: no scalar
    // may hold such a line).
    let parts = split_documents(text, parallelism(text.len()));
    if parts.len() == 1 {
        return parse_part(file, text).0;
    }
    let results: Vec<(FileObjects, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| s.spawn(move || parse_part(file, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| (FileObjects::default(), true)))
            .collect()
    });
    // A broken document: the file again in one pass, for the error as one
    // pass names it (its line numbers) and for what precedes it.
    if results.iter().any(|(_, broken)| *broken) {
        return parse_part(file, text).0;
    }
    let mut out = FileObjects::default();
    for (part, _) in results {
        out.services.extend(part.services);
        out.slices.extend(part.slices);
        out.endpoints.extend(part.endpoints);
        out.nodes.extend(part.nodes);
        out.errors.extend(part.errors);
    }
    out
}

/// Parts for files of a megabyte or more, one per core.
fn parallelism(len: usize) -> usize {
    if len < 1 << 20 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

/// `text` cut into at most `n` runs of whole documents.
fn split_documents(text: &str, n: usize) -> Vec<&str> {
    if n <= 1 {
        return vec![text];
    }
    let target = text.len() / n + 1;
    let mut parts = Vec::new();
    let (mut start, mut pos) = (0, 0);
    for line in text.split_inclusive('\n') {
        if is_marker(line) && pos > start && pos - start >= target {
            parts.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    parts.push(&text[start..]);
    parts
}

/// One run of documents; whether a broken document ended it.
fn parse_part(file: &str, text: &str) -> (FileObjects, bool) {
    match parse_typed(text) {
        Some(out) => (out, false),
        None => parse_generic(file, text),
    }
}

/// One run of documents through their generic trees.
fn parse_generic(file: &str, text: &str) -> (FileObjects, bool) {
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
                return (out, true);
            }
        }
    }
    (out, false)
}

/// The common case, fast: every document one of the kinds the agent
/// reads, named by a top-level `kind:` line, and read straight into its
/// type. The generic tree of each document the general pass builds first
/// (`serde_yaml::Value`, a string and a map per node) was most of the
/// allocations of a 10,000-Service folder's start. None: anything else in
/// `text` (another kind, a `List`, JSON, a document that does not read):
/// the general pass reads it all, and reports what it finds as it always
/// has. The types check `apiVersion` and `kind` themselves, so a document
/// a `kind:` line misnames fails here and goes the general way.
fn parse_typed(text: &str) -> Option<FileObjects> {
    let mut out = FileObjects::default();
    for doc in split_documents_all(text) {
        if blank(doc) {
            continue;
        }
        match top_level_kind(doc)? {
            "Service" => {
                let o: Service = serde_yaml::from_str(doc).ok()?;
                out.services
                    .push((ObjKey::of(&o.metadata), Arc::new(Svc::from(&o))));
            }
            "EndpointSlice" => {
                let o: EndpointSlice = serde_yaml::from_str(doc).ok()?;
                out.slices
                    .push((ObjKey::of(&o.metadata), Arc::new(Slice::from(&o))));
            }
            "Endpoints" => out
                .endpoints
                .push(Arc::new(serde_yaml::from_str(doc).ok()?)),
            "Node" => out.nodes.push(serde_yaml::from_str(doc).ok()?),
            _ => return None,
        }
    }
    Some(out)
}

/// A document marker line: `---` at column 0, alone or before a space.
fn is_marker(line: &str) -> bool {
    line.starts_with("---") && line[3..].chars().next().is_none_or(char::is_whitespace)
}

/// `text` cut at every document marker (each piece starts with its own).
fn split_documents_all(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut pos = 0;
        for line in rest.split_inclusive('\n') {
            if is_marker(line) && pos > 0 {
                break;
            }
            pos += line.len();
        }
        let (doc, tail) = rest.split_at(pos);
        rest = tail;
        Some(doc)
    })
}

/// Whether a document holds nothing but its marker, blank lines and
/// comments (a null document: the general pass skips it too).
fn blank(doc: &str) -> bool {
    doc.lines().enumerate().all(|(i, l)| {
        let l = if i == 0 && is_marker(l) { &l[3..] } else { l };
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// The value of a document's one top-level `kind:` line (None: no such
/// line, or more than one).
fn top_level_kind(doc: &str) -> Option<&str> {
    let mut kinds = doc.lines().filter_map(|l| l.strip_prefix("kind:"));
    let v = kinds.next()?;
    if kinds.next().is_some() {
        return None;
    }
    let v = v.split(" #").next().unwrap_or("").trim();
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(v);
    Some(v)
}

/// Objects of one document (a `List`'s items in order).
fn objects(file: &str, mut docs: Vec<serde_yaml::Value>, out: &mut FileObjects) {
    while let Some(v) = docs.pop() {
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        // Named before the value is consumed (no copy of the tree): only
        // a failed object's error uses it.
        let name = match kind.as_str() {
            "Service" | "EndpointSlice" | "Endpoints" | "Node" => object_name(&v),
            _ => String::new(),
        };
        let err = |e: String| FileError {
            file: file.into(),
            reason: format!("{kind} {name}: {e}"),
        };
        let r = match kind.as_str() {
            "List" | "ServiceList" | "EndpointSliceList" | "EndpointsList" | "NodeList" => {
                let mut v = v;
                if let Some(items) = v.get_mut("items").and_then(|i| i.as_sequence_mut()) {
                    let item_kind = kind.strip_suffix("List").unwrap_or("");
                    for mut item in std::mem::take(items).into_iter().rev() {
                        if let (Some(m), false) = (item.as_mapping_mut(), item_kind.is_empty()) {
                            m.entry("kind".into()).or_insert(item_kind.into());
                        }
                        docs.push(item);
                    }
                }
                Ok(())
            }
            "Service" => serde_yaml::from_value::<Service>(v).map(|o| {
                out.services
                    .push((ObjKey::of(&o.metadata), Arc::new(Svc::from(&o))))
            }),
            "EndpointSlice" => serde_yaml::from_value::<EndpointSlice>(v).map(|o| {
                out.slices
                    .push((ObjKey::of(&o.metadata), Arc::new(Slice::from(&o))))
            }),
            "Endpoints" => serde_yaml::from_value(v).map(|o| out.endpoints.push(Arc::new(o))),
            "Node" => serde_yaml::from_value(v).map(|o| out.nodes.push(o)),
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
    for (k, s) in &f.services {
        objs.services.insert(k.clone(), s.clone());
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
    /// The folder as read by `prefetch`'s thread, taken by the next poll.
    prefetched: Option<std::thread::JoinHandle<Files>>,
}

type Files = BTreeMap<PathBuf, (Stamp, FileObjects)>;

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
            prefetched: None,
        }
    }

    /// Reads and parses the folder on another thread, while the agent
    /// loads its programs and reads its pinned maps: the first `poll` then
    /// finds the files parsed (it re-reads any whose stamp changed since).
    pub fn prefetch(&mut self) {
        let root = self.root.clone();
        self.prefetched = Some(std::thread::spawn(move || {
            let mut src = DirSource::new(root);
            // Errors are found again, and reported, by the poll that
            // takes these files.
            let _ = src.poll();
            src.files
        }));
    }

    /// Rescans the folder. Returns a snapshot when anything changed since
    /// the last call (always on the first).
    pub fn poll(&mut self) -> Result<Option<Snapshot>, FileError> {
        if let Some(files) = self.prefetched.take().and_then(|h| h.join().ok()) {
            self.files = files;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: usize, broken_at: Option<usize>) -> String {
        let mut t = String::new();
        for i in 0..n {
            if Some(i) == broken_at {
                t += "---\napiVersion: v1\nkind: Service\nmetadata: {name: x\n";
                continue;
            }
            t += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n# {}\n",
                i / 250,
                i % 250 + 1,
                "padding ".repeat(20)
            );
        }
        t
    }

    #[test]
    fn a_large_file_parsed_in_parts_gives_what_one_pass_gives() {
        let text = stream(8000, None);
        assert!(text.len() > 1 << 20);
        let parts = split_documents(&text, 3);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), text.len());
        let whole = parse_part("f", &text).0;
        let split = parse("f", &text);
        assert_eq!(whole.services.len(), 8000);
        assert_eq!(split.services, whole.services);

        // A broken document: named by its number in the whole file, and
        // nothing after it is read, as in one pass.
        let text = stream(8000, Some(6000));
        let whole = parse_part("f", &text).0;
        let split = parse("f", &text);
        assert_eq!(split.errors.len(), 1);
        assert_eq!(split.errors[0].to_string(), whole.errors[0].to_string());
        assert!(
            split.errors[0].to_string().contains("document 6001"),
            "{}",
            split.errors[0]
        );
        assert_eq!(split.services.len(), whole.services.len());
    }

    /// The fast path reads what the general pass reads, or leaves the
    /// text to it.
    #[test]
    fn documents_read_straight_into_their_types_as_through_the_tree() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web # a comment\n  namespace: demo\n  annotations: {a: \"1\"}\nspec:\n  selector: {app: web}\n  type: NodePort\n  ports:\n  - name: http\n    port: 80\n    targetPort: \"8080\"\n    protocol: TCP\n  externalTrafficPolicy: Local\n";
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: 'EndpointSlice'\nmetadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.244.1.5]\n  conditions: {ready: true}\n  nodeName: node-a\n  zone: z1\n  hints: {forZones: [{name: z1}]}\n";
        let eps = "apiVersion: v1\nkind: \"Endpoints\"   # quoted\nmetadata: {name: pg, namespace: db}\nsubsets:\n- addresses: [{ip: 192.168.0.10}]\n  ports: [{port: 5432}]\n";
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.2}]}\n";
        let typed = [
            format!("{svc}---\n{slice}---\n{eps}---\n{node}"),
            format!("---\n{svc}--- # next\n{slice}\n---\n\n---\n{node}"),
            format!("# a header\n---\n{eps}"),
            "# nothing but a comment\n".to_string(),
        ];
        for text in &typed {
            let fast = parse_typed(text).unwrap_or_else(|| panic!("typed: {text}"));
            let (slow, broken) = parse_generic("f", text);
            assert!(!broken && slow.errors.is_empty(), "{:?}", slow.errors);
            assert_eq!(fast.services, slow.services);
            assert_eq!(fast.slices, slow.slices);
            assert_eq!(fast.endpoints, slow.endpoints);
            assert_eq!(fast.nodes, slow.nodes);
            assert_eq!(
                fast.services.len() + fast.slices.len() + fast.endpoints.len() + fast.nodes.len(),
                text.matches("\nkind:").count() + usize::from(text.starts_with("kind:")),
            );
        }
        // Left to the general pass: other kinds, lists, JSON, a kind line
        // that misnames its document, two kind lines, a broken document.
        for text in [
            format!("{svc}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n"),
            "apiVersion: v1\nkind: List\nitems: []\n".to_string(),
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"j\"}}\n"
                .to_string(),
            svc.replace("apiVersion: v1", "apiVersion: discovery.k8s.io/v1"),
            format!("{svc}kind: Service\n"),
            format!("{svc}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x\n"),
        ] {
            assert!(parse_typed(&text).is_none(), "{text}");
            // And the whole parse is the general pass's.
            let (slow, _) = parse_generic("f", &text);
            let all = parse("f", &text);
            assert_eq!(all.services, slow.services);
            assert_eq!(all.errors, slow.errors);
        }
    }
}
