//! A small in-repo Kubernetes API server for the agent's cluster source: it
//! speaks the real list/watch protocol over HTTP for Services,
//! EndpointSlices, Endpoints and Nodes, as kube-apiserver does:
//!
//! - every write gets the next global `resourceVersion`; lists return it in
//!   `metadata.resourceVersion`, objects carry their own;
//! - `?watch=true&resourceVersion=N` streams newline-delimited watch events
//!   (`ADDED`, `MODIFIED`, `DELETED`) after N from a history, then live;
//! - `allowWatchBookmarks=true` gets `BOOKMARK` events with the current
//!   version; `timeoutSeconds` ends a watch;
//! - a watch from a version older than the last compaction gets an `ERROR`
//!   event carrying a 410 `Expired` Status, as after etcd compaction;
//! - `fieldSelector=metadata.name=X` (how an agent watches its own Node).
//!
//! Tests drive it directly: apply and delete objects, compact the history,
//! drop every open watch, hold a resource's lists (to see what the agent does
//! before everything has synced), and stop the server for a while and bring
//! it back on the same port with the same data. It records every request so
//! a test can tell a re-list from a resumed watch.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// A resource the server serves: path, kind, list kind, api version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    pub plural: &'static str,
    pub kind: &'static str,
    pub api_version: &'static str,
    pub namespaced: bool,
}

pub const SERVICES: Resource = Resource {
    plural: "services",
    kind: "Service",
    api_version: "v1",
    namespaced: true,
};
pub const ENDPOINTSLICES: Resource = Resource {
    plural: "endpointslices",
    kind: "EndpointSlice",
    api_version: "discovery.k8s.io/v1",
    namespaced: true,
};
pub const ENDPOINTS: Resource = Resource {
    plural: "endpoints",
    kind: "Endpoints",
    api_version: "v1",
    namespaced: true,
};
pub const NODES: Resource = Resource {
    plural: "nodes",
    kind: "Node",
    api_version: "v1",
    namespaced: false,
};
const RESOURCES: [Resource; 4] = [SERVICES, ENDPOINTSLICES, ENDPOINTS, NODES];

fn resource_of_kind(kind: &str) -> Option<Resource> {
    RESOURCES.into_iter().find(|r| r.kind == kind)
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Data {
    rv: u64,
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    held: Vec<&'static str>,
    requests: Vec<String>,
}

struct Shared {
    data: Mutex<Data>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    drop_watches: watch::Sender<u64>,
    /// Released holds.
    released: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// The running server. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    netns: Option<String>,
    serving: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

fn meta_str(o: &Value, field: &str) -> String {
    o.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl ApiServer {
    /// Starts on a free loopback port of the calling process's network
    /// namespace.
    pub fn start() -> Self {
        Self::start_in(None)
    }

    /// Starts on a free loopback port inside a named network namespace
    /// (`ip netns`): only processes in that namespace can reach it.
    pub fn start_in(netns: Option<&str>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("api server runtime");
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            changes,
            drop_watches: watch::channel(0).0,
            released: watch::channel(0).0,
            bookmark_every: Duration::from_millis(300),
        });
        let std_listener = bind_in(netns, "127.0.0.1:0".parse().unwrap()).expect("bind api server");
        let addr = std_listener.local_addr().expect("api server address");
        let mut s = Self {
            shared,
            rt,
            addr,
            netns: netns.map(str::to_string),
            serving: None,
        };
        s.serve(std_listener);
        s
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        let listener = {
            let _guard = self.rt.enter();
            tokio::net::TcpListener::from_std(listener).expect("tokio listener")
        };
        let app = Router::new()
            .route("/api/v1/{plural}", get(list_or_watch))
            .route("/apis/discovery.k8s.io/v1/{plural}", get(list_or_watch))
            .fallback(
                |uri: Uri| async move { (StatusCode::NOT_FOUND, format!("no route for {uri}")) },
            )
            .with_state(self.shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = self.rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.serving = Some((stop, task));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\nusers:\n- name: test\n  user: {{token: test}}\n",
            self.url()
        )
    }

    /// Creates or replaces an object (JSON with apiVersion/kind/metadata).
    pub fn apply(&self, mut object: Value) {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let resource = resource_of_kind(&kind).unwrap_or_else(|| panic!("unserved kind {kind}"));
        let ns = if resource.namespaced {
            let ns = meta_str(&object, "namespace");
            if ns.is_empty() { "default".into() } else { ns }
        } else {
            String::new()
        };
        let name = meta_str(&object, "name");
        let mut d = self.shared.data.lock().unwrap();
        d.rv += 1;
        let rv = d.rv;
        if resource.namespaced {
            object["metadata"]["namespace"] = json!(ns);
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let existed = d
            .objects
            .insert((resource.plural, ns, name), object.clone())
            .is_some();
        let change = Change {
            rv,
            resource,
            kind: if existed { "MODIFIED" } else { "ADDED" },
            object,
        };
        d.history.push(change.clone());
        let _ = self.shared.changes.send(change);
    }

    /// Applies every document of a YAML text.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = serde_yaml::Value::deserialize(doc).expect("test YAML");
            if v.is_null() {
                continue;
            }
            self.apply(serde_json::to_value(v).expect("YAML as JSON"));
        }
    }

    /// Deletes an object; true if it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut d = self.shared.data.lock().unwrap();
        let Some(mut object) =
            d.objects
                .remove(&(resource.plural, namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        d.rv += 1;
        let rv = d.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            resource,
            kind: "DELETED",
            object,
        };
        d.history.push(change.clone());
        let _ = self.shared.changes.send(change);
        true
    }

    /// Forgets the event history, as etcd compaction does: a watch from
    /// any version before now gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut d = self.shared.data.lock().unwrap();
        d.compacted = d.rv + 1;
        d.history.clear();
    }

    /// Ends every open watch connection (clients reconnect).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// Lists of `resource` wait until `release` (watches are unaffected).
    pub fn hold(&self, resource: Resource) {
        self.shared.data.lock().unwrap().held.push(resource.plural);
    }

    pub fn release(&self) {
        self.shared.data.lock().unwrap().held.clear();
        self.shared.released.send_modify(|g| *g += 1);
    }

    /// Stops answering: the listener closes and open watches end. The data
    /// stays, as etcd's would.
    pub fn stop(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(());
            // Watches end, so graceful shutdown closes every connection.
            self.drop_watches();
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
    }

    /// Serves again on the same address.
    pub fn restart(&mut self) {
        // The old socket may linger for a moment.
        let mut listener = None;
        for _ in 0..50 {
            if let Ok(l) = bind_in(self.netns.as_deref(), self.addr) {
                listener = Some(l);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.serve(listener.expect("rebind api server on its old port"));
    }

    /// Every request so far, as "list services" / "watch services rv=N".
    pub fn requests(&self) -> Vec<String> {
        self.shared.data.lock().unwrap().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening socket made in `netns` (a socket stays in the namespace it
/// was created in): bound from a thread that entered it.
fn bind_in(netns: Option<&str>, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let netns = netns.map(|n| format!("/run/netns/{n}"));
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let f = std::fs::File::open(&path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace fd; affects this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .expect("bind thread")
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("json");
    b.push(b'\n');
    Bytes::from(b)
}

async fn list_or_watch(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(plural): axum::extract::Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(resource) = RESOURCES.into_iter().find(|r| r.plural == plural) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(status(404, "NotFound", format!("{plural} not served"))),
        )
            .into_response();
    };
    let name_filter = q
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_string);
    let matches = move |o: &Value| {
        name_filter
            .as_deref()
            .is_none_or(|n| meta_str(o, "name") == n)
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        shared
            .data
            .lock()
            .unwrap()
            .requests
            .push(format!("list {plural}"));
        // A held resource's list waits for `release`.
        let mut released = shared.released.subscribe();
        while shared.data.lock().unwrap().held.contains(&resource.plural) {
            if released.changed().await.is_err() {
                break;
            }
        }
        let d = shared.data.lock().unwrap();
        let items: Vec<&Value> = d
            .objects
            .iter()
            .filter(|((p, _, _), o)| *p == resource.plural && matches(o))
            .map(|(_, o)| o)
            .collect();
        return axum::Json(json!({
            "apiVersion": resource.api_version,
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": d.rv.to_string()},
            "items": items,
        }))
        .into_response();
    }

    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    // Subscribed under the lock that reads the history: no event is missed
    // or sent twice.
    let (mut live, replay, gone, current) = {
        let mut d = shared.data.lock().unwrap();
        d.requests.push(format!("watch {plural} rv={from}"));
        let live = shared.changes.subscribe();
        let gone = from != 0 && from < d.compacted;
        let replay: Vec<Change> = d
            .history
            .iter()
            .filter(|c| c.rv > from && c.resource == resource && matches(&c.object))
            .cloned()
            .collect();
        (live, replay, gone, d.rv)
    };
    let mut dropped = shared.drop_watches.subscribe();
    let every = shared.bookmark_every;
    let shared2 = shared.clone();
    tokio::spawn(async move {
        if gone {
            let msg = format!("too old resource version: {from} ({current})");
            let _ = tx
                .send(line(
                    &json!({"type": "ERROR", "object": status(410, "Expired", msg)}),
                ))
                .await;
            return;
        }
        let mut last = from;
        for c in replay {
            last = c.rv;
            if tx
                .send(line(&json!({"type": c.kind, "object": c.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut tick = tokio::time::interval(every);
        loop {
            let out = tokio::select! {
                c = live.recv() => match c {
                    Ok(c) if c.rv > last && c.resource == resource && matches(&c.object) => {
                        last = c.rv;
                        json!({"type": c.kind, "object": c.object})
                    }
                    Ok(_) => continue,
                    Err(_) => return, // lagged or closed: the client re-watches
                },
                _ = tick.tick(), if bookmarks => {
                    // Every change up to the bookmark's version is sent
                    // before it (they were broadcast under the same lock).
                    let mut out = Vec::new();
                    {
                        let d = shared2.data.lock().unwrap();
                        while let Ok(c) = live.try_recv() {
                            if c.rv > last && c.resource == resource && matches(&c.object) {
                                last = c.rv;
                                out.push(json!({"type": c.kind, "object": c.object}));
                            }
                        }
                        last = last.max(d.rv);
                    }
                    out.push(json!({"type": "BOOKMARK", "object": {
                        "kind": resource.kind,
                        "apiVersion": resource.api_version,
                        "metadata": {"resourceVersion": last.to_string()},
                    }}));
                    for o in &out[..out.len() - 1] {
                        if tx.send(line(o)).await.is_err() {
                            return;
                        }
                    }
                    out.pop().expect("bookmark")
                }
                _ = dropped.changed() => return,
                _ = &mut end => return,
            };
            if tx.send(line(&out)).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("watch response")
}
