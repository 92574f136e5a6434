//! The cluster source: kube-runtime watchers on Services, EndpointSlices,
//! this node's Node, ServiceCIDRs (unless `--service-cidr` names them) and,
//! when asked, Endpoints. Each watcher lists, then
//! watches from the list's resourceVersion; after a dropped connection it
//! resumes from the last version it saw (bookmarks keep that fresh), and on
//! 410 Gone it lists again. A re-list is a full replacement: what it no
//! longer has is deleted from the store, so nothing stale survives an
//! outage.

use std::{collections::BTreeMap, path::Path, pin::Pin, sync::Arc};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};

use crate::agent::{model::ObjKey, slice::Slice, store::Store, svc::Svc};

/// Which object kind an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
    Node,
    ServiceCidr,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Endpoints => "Endpoints",
            Self::Node => "Node",
            Self::ServiceCidr => "ServiceCIDR",
        }
    }
}

/// One item from the merged watch streams. Moved once, from the stream
/// into the store: boxing would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum Update {
    Service(Event<Service>),
    Slice(Event<EndpointSlice>),
    Endpoints(Event<Endpoints>),
    Node(Event<Node>),
    ServiceCidr(Event<ServiceCIDR>),
    /// A list or watch failed; the watcher retries with backoff.
    Error(Kind, String),
    /// An optional kind the API does not serve (404) or this agent may not
    /// read (403): its watch has ended; the agent does without it.
    Unavailable(Kind, String),
}

pub type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

/// A client from `--kubeconfig`, else the usual inference ($KUBECONFIG,
/// ~/.kube/config, then the in-cluster service account).
/// The API client and the server's URL (for the agent's status record).
pub async fn client(kubeconfig: Option<&Path>) -> Result<(Client, String)> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", p.display()))?
        }
        None => Config::infer()
            .await
            .context("finding the cluster (kubeconfig or in-cluster)")?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).context("building the API client")?;
    Ok((client, url))
}

fn stream<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Event<K>) -> Update,
) -> Updates
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, config)
        .default_backoff()
        .map(move |r| match r {
            Ok(ev) => wrap(ev),
            Err(e) => Update::Error(kind, e.to_string()),
        })
        .boxed()
}

/// A watch on a kind the agent can do without: a 404 or 403 on its list
/// ends it with one [`Update::Unavailable`] (a cluster older than the
/// resource, or RBAC without it), where [`stream`] would retry forever.
fn optional_stream<K>(api: Api<K>, kind: Kind, wrap: fn(Event<K>) -> Update) -> Updates
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .scan(false, move |ended, r| {
            if *ended {
                return futures::future::ready(None);
            }
            let u = match r {
                Ok(ev) => wrap(ev),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                    if s.code == 404 || s.code == 403 =>
                {
                    *ended = true;
                    Update::Unavailable(kind, format!("{} {}", s.code, s.message))
                }
                Err(e) => Update::Error(kind, e.to_string()),
            };
            futures::future::ready(Some(u))
        })
        .boxed()
}

/// Objects per page of the initial lists (kube-runtime's default is 500).
/// A page is held whole, as JSON and as objects, until each object is
/// compacted: 100 a page keeps that transient small (a 10,000-Service
/// list is 200 requests to the API server instead of 40).
const LIST_PAGE: u32 = 100;

/// How the Services, EndpointSlices and Endpoints are listed and watched.
fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

/// The merged watch streams.
pub fn watch(client: &Client, node_name: &str, endpoints: bool, service_cidrs: bool) -> Updates {
    let mut streams = vec![
        stream(
            Api::<Service>::all(client.clone()),
            list_config(),
            Kind::Service,
            Update::Service,
        ),
        stream(
            Api::<EndpointSlice>::all(client.clone()),
            list_config(),
            Kind::EndpointSlice,
            Update::Slice,
        ),
        stream(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            Kind::Node,
            Update::Node,
        ),
    ];
    if service_cidrs {
        streams.push(optional_stream(
            Api::<ServiceCIDR>::all(client.clone()),
            Kind::ServiceCidr,
            Update::ServiceCidr,
        ));
    }
    if endpoints {
        streams.push(stream(
            Api::<Endpoints>::all(client.clone()),
            list_config(),
            Kind::Endpoints,
            Update::Endpoints,
        ));
    }
    futures::stream::select_all(streams).boxed()
}

/// One kind's list-then-watch progress.
#[derive(Debug)]
struct KindSync<K> {
    /// Objects of a list in progress.
    listing: Option<BTreeMap<ObjKey, Arc<K>>>,
    /// A full list has been applied once.
    synced: bool,
}

impl<K> Default for KindSync<K> {
    fn default() -> Self {
        Self {
            listing: None,
            synced: false,
        }
    }
}

/// What an event did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// A re-list completed (the first, or after a 410 / long outage).
    pub listed: bool,
}

/// Feeds watch events into the store; tracks which kinds have synced.
#[derive(Debug)]
pub struct ClusterSync {
    services: KindSync<Svc>,
    slices: KindSync<Slice>,
    endpoints: KindSync<Endpoints>,
    nodes: KindSync<Node>,
    cidr_sync: KindSync<ServiceCIDR>,
    watch_endpoints: bool,
    /// This agent's Node, once seen.
    pub node: Option<Node>,
    /// `spec.cidrs` of each ServiceCIDR object, by name; None before the
    /// first list (nothing is dropped until then).
    service_cidrs: Option<BTreeMap<String, Vec<String>>>,
}

/// What the agent never reads is not kept: `managedFields` (server-side
/// apply's field owners) is often the largest part of an object the API
/// sends.
fn trim<K: Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

/// Applies one event of one kind to `ctx`: a live change at once; a list
/// is buffered and replaces the kind when it is complete. Each object is
/// kept as `convert` makes it (EndpointSlices compacted at once, so a list
/// never holds them whole).
#[allow(clippy::too_many_arguments)]
fn step<C, K: Resource, T>(
    sync: &mut KindSync<T>,
    ev: Event<K>,
    ctx: &mut C,
    key: fn(&K) -> ObjKey,
    convert: fn(K) -> T,
    apply: fn(&mut C, ObjKey, Option<Arc<T>>),
    replace: fn(&mut C, BTreeMap<ObjKey, Arc<T>>),
) -> Applied {
    match ev {
        Event::Init => sync.listing = Some(BTreeMap::new()),
        Event::InitApply(o) => {
            let o = trim(o);
            let k = key(&o);
            sync.listing
                .get_or_insert_with(BTreeMap::new)
                .insert(k, Arc::new(convert(o)));
        }
        Event::InitDone => {
            replace(ctx, sync.listing.take().unwrap_or_default());
            sync.synced = true;
            return Applied { listed: true };
        }
        Event::Apply(o) => {
            let o = trim(o);
            apply(ctx, key(&o), Some(Arc::new(convert(o))))
        }
        Event::Delete(o) => apply(ctx, key(&o), None),
    }
    Applied::default()
}

impl ClusterSync {
    pub fn new(watch_endpoints: bool) -> Self {
        Self {
            services: KindSync::default(),
            slices: KindSync::default(),
            endpoints: KindSync::default(),
            nodes: KindSync::default(),
            cidr_sync: KindSync::default(),
            watch_endpoints,
            node: None,
            service_cidrs: None,
        }
    }

    /// Every ServiceCIDR object's `spec.cidrs`, once listed. Not part of
    /// [`Self::ready`]: a cluster older than the resource (or RBAC without
    /// it) still gets its Services, only no unallocated-address drop.
    pub fn service_cidrs(&self) -> Option<impl Iterator<Item = &str>> {
        self.service_cidrs
            .as_ref()
            .map(|m| m.values().flatten().map(String::as_str))
    }

    /// Nothing is programmed before every watched kind has listed once:
    /// a Service without its slices would look like one without backends.
    pub fn ready(&self) -> bool {
        self.services.synced
            && self.slices.synced
            && self.nodes.synced
            && (!self.watch_endpoints || self.endpoints.synced)
    }

    /// Kinds not listed yet, for the log.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (synced, kind) in [
            (self.services.synced, Kind::Service),
            (self.slices.synced, Kind::EndpointSlice),
            (self.nodes.synced, Kind::Node),
            (
                !self.watch_endpoints || self.endpoints.synced,
                Kind::Endpoints,
            ),
        ] {
            if !synced {
                out.push(kind.label());
            }
        }
        out
    }

    pub fn apply(&mut self, store: &mut Store, update: Update) -> Applied {
        match update {
            Update::Service(ev) => step(
                &mut self.services,
                ev,
                store,
                |o| ObjKey::of(&o.metadata),
                |o| Svc::from(&o),
                Store::service,
                Store::replace_services,
            ),
            Update::Slice(ev) => step(
                &mut self.slices,
                ev,
                store,
                |o| ObjKey::of(&o.metadata),
                |o| Slice::from(&o),
                Store::slice,
                Store::replace_slices,
            ),
            Update::Endpoints(ev) => step(
                &mut self.endpoints,
                ev,
                store,
                |o| ObjKey::of(&o.metadata),
                |o| o,
                Store::endpoints,
                Store::replace_endpoints,
            ),
            Update::Node(ev) => {
                // The watch selects this node by name: whatever it says is
                // this node (deleted: none).
                let mut node = self.node.take();
                let applied = step(
                    &mut self.nodes,
                    ev,
                    &mut node,
                    |o| ObjKey::new("", o.metadata.name.clone().unwrap_or_default()),
                    |o| o,
                    |n, _, o| *n = o.map(|o| (*o).clone()),
                    |n, all| *n = all.into_values().next().map(|o| (*o).clone()),
                );
                self.node = node;
                applied
            }
            Update::ServiceCidr(ev) => {
                let mut cidrs = self.service_cidrs.take().unwrap_or_default();
                let applied = step(
                    &mut self.cidr_sync,
                    ev,
                    &mut cidrs,
                    |o| ObjKey::new("", o.metadata.name.clone().unwrap_or_default()),
                    |o| o,
                    |m, k, o| match o {
                        Some(o) => {
                            m.insert(k.name.clone(), cidrs_of(&o));
                        }
                        None => {
                            m.remove(&k.name);
                        }
                    },
                    |m, all| {
                        *m = all
                            .into_iter()
                            .map(|(k, o)| (k.name, cidrs_of(&o)))
                            .collect()
                    },
                );
                if self.cidr_sync.synced {
                    self.service_cidrs = Some(cidrs);
                }
                applied
            }
            Update::Error(..) | Update::Unavailable(..) => Applied::default(),
        }
    }
}

fn cidrs_of(o: &ServiceCIDR) -> Vec<String> {
    o.spec
        .as_ref()
        .and_then(|s| s.cidrs.clone())
        .unwrap_or_default()
}
