//! Unit and property tests: objects -> desired state -> map entries, the
//! diff, id adoption, the fault-injecting writer, the directory source.

use std::{collections::BTreeSet, net::Ipv4Addr};

use lb_common::{ip4_octets, port_host};

use super::{
    apply::{Faulty, InMemory},
    model::{self, BackendState, FrontendKind, NodeInfo, Objects, Proto, ServicePortKey},
    reconcile::Reconciler,
    source::dir,
    state::{MapState, cstr},
    store::Store,
};

/// Feeds `objs` into the store one object at a time, as watch events would
/// arrive: deletes of what `objs` lacks, then adds and updates.
fn feed(store: &mut Store, objs: &Objects) {
    let cur = store.objects().clone();
    for k in cur
        .services
        .keys()
        .filter(|k| !objs.services.contains_key(*k))
    {
        store.service(k.clone(), None);
    }
    for k in cur.slices.keys().filter(|k| !objs.slices.contains_key(*k)) {
        store.slice(k.clone(), None);
    }
    for k in cur
        .endpoints
        .keys()
        .filter(|k| !objs.endpoints.contains_key(*k))
    {
        store.endpoints(k.clone(), None);
    }
    for (k, v) in &objs.slices {
        store.slice(k.clone(), Some(std::sync::Arc::new((**v).clone())));
    }
    for (k, v) in &objs.endpoints {
        store.endpoints(k.clone(), Some(std::sync::Arc::new((**v).clone())));
    }
    for (k, v) in &objs.services {
        store.service(k.clone(), Some(std::sync::Arc::new((**v).clone())));
    }
}

/// Translates the store's dirty Services into the reconciler's target.
fn stage<W: super::apply::MapWriter>(store: &mut Store, rec: &mut Reconciler<W>, n: &NodeInfo) {
    for c in store.take_changes(n) {
        rec.set_service(&c.service, c.ports.unwrap_or_default())
            .unwrap();
    }
    rec.set_snat_addrs(&n.snat.into_iter().collect::<Vec<_>>());
}

fn objects(yaml: &str) -> Objects {
    let f = dir::parse("test.yaml", yaml);
    assert!(f.errors.is_empty(), "{:?}", f.errors);
    let mut o = Objects::default();
    dir::merge(&mut o, &mut Default::default(), &f);
    o
}

fn node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
        snat: None,
        balancing: Default::default(),
    }
}

fn key(ns: &str, name: &str, port: &str) -> ServicePortKey {
    ServicePortKey {
        namespace: ns.into(),
        name: name.into(),
        port_name: port.into(),
    }
}

/// The map state with ids resolved to names: two states that forward the
/// same way compare equal whatever ids they were given.
fn canonical(s: &MapState) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (k, f) in &s.frontends {
        let m = s
            .service_meta
            .get(&f.service_id)
            .expect("frontend's service has meta");
        let mut backends = Vec::new();
        for slot in 0..f.count as u32 {
            let id = s.slot(f.backend_set, slot).expect("slot");
            let b = s.backends.get(&id).expect("backend");
            backends.push(format!(
                "{}:{}/{}",
                Ipv4Addr::from(ip4_octets(b.addr)),
                port_host(b.port),
                b.state
            ));
        }
        out.insert(format!(
            "{}:{}/{} {}/{}:{} count={} term={} kind={} flags={} -> {}",
            Ipv4Addr::from(ip4_octets(k.addr)),
            port_host(k.port),
            k.proto,
            cstr(&m.namespace),
            cstr(&m.name),
            cstr(&m.port_name),
            f.count,
            f.terminating,
            f.kind,
            f.flags,
            backends.join(",")
        ));
    }
    // The address filter holds exactly the frontend addresses.
    let fronts: BTreeSet<u32> = s.frontends.keys().map(|k| k.addr).collect();
    let addrs: BTreeSet<u32> = s.addrs.keys().copied().collect();
    assert_eq!(fronts, addrs, "address filter out of step with frontends");
    // The names map holds exactly the node and zone names backends carry.
    let carried: BTreeSet<u32> = s
        .backends
        .values()
        .flat_map(|b| {
            [
                crate::agent::names::node_key(b.node),
                crate::agent::names::zone_key(b.zone),
            ]
        })
        .flatten()
        .collect();
    let named: BTreeSet<u32> = s.names.keys().copied().collect();
    assert_eq!(carried, named, "names out of step with backends");
    // Nothing dangling: every slot's set is pointed at, every backend used.
    let sets: BTreeSet<u32> = s.frontends.values().map(|f| f.backend_set).collect();
    assert!(
        s.slots.keys().all(|k| sets.contains(&k.backend_set)),
        "orphan backend set in {}",
        s.dump()
    );
    // Every slot's backend exists and is, for its Service port, in the
    // list the frontend reads; every port backend entry names a port and a
    // backend that exist. (A backend may be in no set: terminating ones
    // kept for their flows, remote ones under a Local policy.)
    use lb_common::service::{FE_LOCAL_LIST, SB_CLUSTER, SB_LOCAL, ServiceBackendKey};
    for f in s.frontends.values() {
        let bit = if f.flags & FE_LOCAL_LIST != 0 {
            SB_LOCAL
        } else {
            SB_CLUSTER
        };
        for (_, _, id) in s.slot_entries().filter(|(set, _, _)| *set == f.backend_set) {
            assert!(s.backends.contains_key(&id), "slot to a missing backend");
            let sb = s.svc_backends.get(&ServiceBackendKey {
                service_id: f.service_id,
                backend_id: id,
            });
            assert!(
                sb.is_some_and(|v| v & bit != 0),
                "backend {id} of service {} not marked {bit:#x} in {}",
                f.service_id,
                s.dump()
            );
        }
    }
    for k in s.svc_backends.keys() {
        assert!(
            s.service_meta.contains_key(&k.service_id) && s.backends.contains_key(&k.backend_id),
            "dangling service backend {k:?} in {}",
            s.dump()
        );
    }
    out
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.9]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: metrics, port: 9090, targetPort: 9090, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: metrics, port: 9090}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}
- {addresses: [10.244.2.12], conditions: {ready: true}, nodeName: node-b, zone: z2}
- {addresses: [10.244.2.13], conditions: {ready: false, serving: true, terminating: true}, nodeName: node-b}
- {addresses: [10.244.2.14], conditions: {ready: false}, nodeName: node-b}
"#;

#[test]
fn service_ports_get_frontends_and_named_backend_ports() {
    let d = model::translate(&objects(WEB), &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let http = &d.ports[&key("demo", "web", "http")];
    let fronts: Vec<(String, u16, FrontendKind)> = http
        .frontends
        .iter()
        .map(|f| (f.addr.to_string(), f.port, f.kind))
        .collect();
    assert_eq!(
        fronts,
        vec![
            ("10.96.0.10".into(), 80, FrontendKind::ClusterIp),
            ("172.18.0.2".into(), 30080, FrontendKind::NodePort),
            ("203.0.113.9".into(), 80, FrontendKind::ExternalIp),
        ]
    );
    // targetPort "http" resolved by the slice's port of the same name.
    let backends: Vec<(String, u16, BackendState, bool)> = http
        .backends
        .iter()
        .map(|b| (b.addr.addr.to_string(), b.addr.port, b.state, b.local))
        .collect();
    assert_eq!(
        backends,
        vec![
            ("10.244.1.11".into(), 8080, BackendState::Active, true),
            ("10.244.2.12".into(), 8080, BackendState::Active, false),
            ("10.244.2.13".into(), 8080, BackendState::Terminating, false),
            ("10.244.2.14".into(), 8080, BackendState::Quarantined, false),
        ],
        "not ready and not serving endpoints are kept for their TCP flows"
    );
    let dns = &d.ports[&key("demo", "web", "dns")];
    assert_eq!(dns.proto, Proto::Udp);
    assert_eq!(dns.backends[0].addr.port, 5353);
    // A port without nodePort gets no NodePort frontend.
    assert!(
        d.ports[&key("demo", "web", "metrics")]
            .frontends
            .iter()
            .all(|f| f.kind != FrontendKind::NodePort)
    );
}

#[test]
fn headless_external_name_and_foreign_proxies_get_nothing() {
    let d = model::translate(
        &objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: labelled-headless, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.31, ports: [{port: 80}]}
"#,
        ),
        &node(),
    );
    assert!(
        d.ports.is_empty(),
        "{:?}",
        d.ports.keys().collect::<Vec<_>>()
    );
    assert!(d.errors.is_empty());
}

#[test]
fn slices_labelled_headless_or_for_another_proxy_serve_nothing() {
    // kube-proxy's informers leave these slices out whatever their
    // service-name label says (upstream e2e: "should implement
    // service.kubernetes.io/headless").
    let d = model::translate(
        &objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-headless
  namespace: demo
  labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ""}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.11], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-other
  namespace: demo
  labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: someone-else}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.12], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.13], conditions: {ready: true}}]
"#,
        ),
        &node(),
    );
    let web = &d.ports[&key("demo", "web", "")];
    let addrs: Vec<String> = web
        .backends
        .iter()
        .map(|b| b.addr.addr.to_string())
        .collect();
    assert_eq!(addrs, vec!["10.244.1.13".to_string()]);
}

#[test]
fn selectorless_service_uses_hand_written_endpoints() {
    // The PostgreSQL primary outside the cluster, and twelve gateways on six
    // hosts with two ports each behind one Service port.
    let d = model::translate(
        &objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: postgres, namespace: db}
spec: {clusterIP: 10.96.5.5, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: postgres, namespace: db}
subsets: [{addresses: [{ip: 192.168.0.10}], ports: [{port: 5432}]}]
---
apiVersion: v1
kind: Service
metadata: {name: rgw, namespace: ceph}
spec: {clusterIP: 10.96.6.6, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: rgw, namespace: ceph}
subsets:
- addresses: [{ip: 10.0.0.1}, {ip: 10.0.0.2}, {ip: 10.0.0.3}, {ip: 10.0.0.4}, {ip: 10.0.0.5}, {ip: 10.0.0.6}]
  ports: [{name: http, port: 8080}]
- addresses: [{ip: 10.0.0.1}, {ip: 10.0.0.2}, {ip: 10.0.0.3}, {ip: 10.0.0.4}, {ip: 10.0.0.5}, {ip: 10.0.0.6}]
  ports: [{name: http, port: 8081}]
"#,
        ),
        &node(),
    );
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let pg = &d.ports[&key("db", "postgres", "")];
    assert_eq!(pg.backends.len(), 1);
    assert_eq!(pg.backends[0].addr.to_string(), "192.168.0.10:5432/TCP");
    let rgw = &d.ports[&key("ceph", "rgw", "http")];
    assert_eq!(rgw.backends.len(), 12);
    let ports: BTreeSet<u16> = rgw.backends.iter().map(|b| b.addr.port).collect();
    assert_eq!(ports, BTreeSet::from([8080, 8081]));
}

#[test]
fn bad_objects_are_reported_by_name_and_skipped_alone() {
    let d = model::translate(
        &objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad-proto, namespace: x}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80, protocol: QUIC}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port, namespace: x}
spec: {clusterIP: 10.96.0.2, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: x}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: good, namespace: x}
spec: {clusterIP: 10.96.0.4, ports: [{port: 80}]}
"#,
        ),
        &node(),
    );
    let errs: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs[0].contains("x/bad-ip") && errs[0].contains("10.96.0.300"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("x/bad-port") && errs[1].contains("70000"),
        "{errs:?}"
    );
    assert!(
        errs[2].contains("x/bad-proto") && errs[2].contains("QUIC"),
        "{errs:?}"
    );
    assert_eq!(
        d.ports.keys().collect::<Vec<_>>(),
        vec![&key("x", "good", "")]
    );
}

#[test]
fn manifest_from_the_kubernetes_docs_works_as_written() {
    // "Defining a Service" (concepts/services-networking/service), with the
    // clusterIP the API server would assign.
    let d = model::translate(
        &objects(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  clusterIP: 10.96.100.1
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
spec: {}
"#,
        ),
        &node(),
    );
    assert!(d.errors.is_empty());
    assert_eq!(d.ports.len(), 1);
    assert!(
        d.ports[&key("default", "my-service", "")]
            .backends
            .is_empty()
    );
}

#[test]
fn unchanged_input_writes_nothing_and_one_endpoint_a_handful() {
    let objs = objects(WEB);
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    let first = rec.reconcile(&model::translate(&objs, &node())).unwrap();
    assert!(first.writes > 0);
    assert_eq!(
        rec.reconcile(&model::translate(&objs, &node()))
            .unwrap()
            .writes,
        0
    );

    // One more ready endpoint: a backend, its meta, the port's new set
    // (3 ready + 1 terminating slots) and its 3 frontends flipped, the old
    // set's slots deleted. The other two ports' sets also grow.
    let more = WEB.replace(
        "- {addresses: [10.244.2.14], conditions: {ready: false}, nodeName: node-b}",
        "- {addresses: [10.244.2.14], conditions: {ready: true}, nodeName: node-b}",
    );
    let o = rec
        .reconcile(&model::translate(&objects(&more), &node()))
        .unwrap();
    assert!(o.writes < 40, "{} writes for one endpoint", o.writes);
    assert_eq!(
        rec.reconcile(&model::translate(&objects(&more), &node()))
            .unwrap()
            .writes,
        0
    );
}

#[test]
fn fields_not_enforced_are_named_and_sctp_ports_recorded_without_frontends() {
    use lb_common::service::*;
    let objs = objects(
        r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: x}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  sessionAffinity: ClientIP
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  loadBalancerSourceRanges: [10.0.0.0/8]
  trafficDistribution: PreferClose
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: sig, port: 5060, protocol: SCTP, nodePort: 30081}
status: {loadBalancer: {ingress: [{ip: 192.0.2.1, ipMode: Proxy}]}}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: x}
spec: {clusterIP: 10.96.0.31, ports: [{port: 80}]}
"#,
    );
    let d = model::translate(&objs, &node());
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    let http = &d.ports[&key("x", "lb", "http")];
    // Affinity, traffic policies, topology hints, health check node
    // ports and source ranges are enforced, the ipMode Proxy ingress IP is
    // not captured (as kube-proxy does): only SCTP is left.
    let want = 0;
    assert_eq!(http.not_enforced, want);
    assert_eq!(http.source_ranges, [(Ipv4Addr::new(10, 0, 0, 0), 8)]);
    assert!(!http.frontends.is_empty());
    assert!(
        http.frontends
            .iter()
            .all(|f| f.addr != Ipv4Addr::new(192, 0, 2, 1)),
        "ipMode Proxy ingress IP captured: {:?}",
        http.frontends
    );
    let sctp = &d.ports[&key("x", "lb", "sig")];
    assert_eq!(sctp.not_enforced, want | NE_PROTOCOL_SCTP);
    assert!(sctp.frontends.is_empty() && sctp.backends.is_empty());
    assert_eq!(d.ports[&key("x", "plain", "")].not_enforced, 0);

    // In the maps: the SCTP port has its names (for lbctl) and nothing a
    // packet could meet.
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&d).unwrap();
    let st = &rec.writer.state;
    let metas: Vec<(String, u32)> = st
        .service_meta
        .values()
        .map(|m| (cstr(&m.port_name).to_string(), m.not_enforced))
        .collect();
    assert!(
        metas.contains(&("sig".into(), want | NE_PROTOCOL_SCTP)),
        "{metas:?}"
    );
    assert!(
        !st.frontends
            .keys()
            .any(|k| k.proto == lb_common::PROTO_SCTP),
        "an SCTP frontend was written"
    );
}

/// A cluster of `n` Services, each with a slice of 10 endpoints.
fn big_cluster(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-x, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n",
            i / 250,
            i % 250 + 1
        );
        for e in 0..10 {
            y += &format!(
                "- {{addresses: [10.{}.{}.{}]}}\n",
                100 + i / 250,
                i % 250,
                e + 1
            );
        }
    }
    y
}

#[test]
fn one_slice_change_is_translated_and_diffed_alone() {
    let n = node();
    let objs = objects(&big_cluster(300));
    let mut store = Store::default();
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    feed(&mut store, &objs);
    stage(&mut store, &mut rec, &n);
    rec.flush().unwrap();
    assert_eq!(rec.port_count(), 300);

    // One endpoint more in one slice: only that Service is translated, and
    // the writes are its new set, its backend and its frontend flip.
    let key = model::ObjKey::new("ns", "s7-x");
    let mut slice = (**store.objects().slices.get(&key).unwrap()).clone();
    let mut ep = slice.endpoints[0].clone();
    ep.address = Some(std::net::Ipv4Addr::new(10, 200, 0, 1));
    slice.endpoints.push(ep);
    store.slice(key, Some(std::sync::Arc::new(slice)));
    let changes: Vec<_> = store.take_changes(&n).collect();
    assert_eq!(changes.len(), 1, "one Service re-translated");
    for c in changes {
        rec.set_service(&c.service, c.ports.unwrap()).unwrap();
    }
    let before = rec.writer.writes;
    let o = rec.flush().unwrap();
    // The backend (its node's name is in the maps already), what it is to
    // its port, the new set (11 slots: one chunk), the frontend, the old
    // set (one chunk).
    assert_eq!(o.writes, 1 + 1 + 1 + 1 + 1, "{}", rec.state().dump());
    assert_eq!(rec.writer.writes - before, o.writes);
    let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
    fresh
        .reconcile(&model::translate(store.objects(), &n))
        .unwrap();
    assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
}

#[test]
fn a_restarted_agent_adopts_ids_and_writes_nothing() {
    let desired = model::translate(&objects(WEB), &node());
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&desired).unwrap();
    let before = rec.state();
    let maps = InMemory {
        state: before.clone(),
        writes: 0,
    };
    let mut restarted = Reconciler::adopt(maps).unwrap();
    assert_eq!(restarted.reconcile(&desired).unwrap().writes, 0);
    assert_eq!(restarted.state(), before, "ids and sets kept");
    assert_eq!(
        restarted.service_id(&key("demo", "web", "http")),
        rec.service_id(&key("demo", "web", "http"))
    );
}

/// Maps an agent wrote before backends carried node and zone ids (their
/// names were in `LB_BE_META_V1`, now retired): the first flush gives every
/// backend its ids and conditions in place, under the same backend id, and
/// puts the names; nothing else is written and no backend moves.
#[test]
fn maps_from_before_name_ids_get_them_in_place() {
    let desired = model::translate(&objects(WEB), &node());
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&desired).unwrap();
    let now = rec.state();
    assert!(!now.names.is_empty(), "WEB has node and zone names");
    let mut old = now.clone();
    for b in old.backends.values_mut() {
        b.flags &= lb_common::service::BACKEND_LOCAL;
        b.node = 0;
        b.zone = 0;
    }
    old.names.clear();
    let maps = InMemory {
        state: old,
        writes: 0,
    };
    let mut upgraded = Reconciler::adopt(maps).unwrap();
    let o = upgraded.reconcile(&desired).unwrap();
    assert_eq!(o.writes, now.backends.len() + now.names.len());
    assert_eq!(
        upgraded.state(),
        now,
        "same ids, entries as a fresh agent's"
    );
}

#[test]
fn dir_parse_reports_broken_documents_by_file() {
    let f = dir::parse(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a\n",
    );
    assert_eq!(f.errors.len(), 1);
    assert!(
        f.errors[0].to_string().starts_with("broken.yaml: "),
        "{}",
        f.errors[0]
    );
    let f = dir::parse(
        "list.yaml",
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: 7}}\n",
    );
    assert_eq!(f.services.len(), 1);
    assert_eq!(f.errors.len(), 1);
    assert!(
        f.errors[0].to_string().contains("Service default/b"),
        "{}",
        f.errors[0]
    );
}

#[test]
fn dir_source_follows_added_changed_and_removed_files() {
    let tmp = std::env::temp_dir().join(format!("lbctl-dir-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut src = dir::DirSource::new(&tmp);
    assert_eq!(src.poll().unwrap().unwrap().objects.services.len(), 0);
    assert!(src.poll().unwrap().is_none(), "no change, no snapshot");
    std::fs::write(
        tmp.join("a"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
    )
    .unwrap();
    assert_eq!(src.poll().unwrap().unwrap().objects.services.len(), 1);
    std::fs::write(tmp.join("a"), "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bb}\n").unwrap();
    assert_eq!(src.poll().unwrap().unwrap().objects.services.len(), 2);
    std::fs::write(tmp.join("a"), "{{{").unwrap();
    let snap = src.poll().unwrap().unwrap();
    assert_eq!(snap.objects.services.len(), 0);
    assert_eq!(snap.errors.len(), 1);
    std::fs::remove_file(tmp.join("a")).unwrap();
    let snap = src.poll().unwrap().unwrap();
    assert!(snap.errors.is_empty() && snap.objects.services.is_empty());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The folder read ahead (while the agent loads its programs and reads its
/// pinned maps) gives the first poll what reading it then would, and a
/// file changed after the read-ahead is read again.
#[test]
fn dir_source_read_ahead_gives_what_the_first_poll_would() {
    let tmp = std::env::temp_dir().join(format!("lbctl-dir-ahead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let svc = |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    std::fs::write(tmp.join("a"), svc("a")).unwrap();
    std::fs::write(tmp.join("b"), svc("b")).unwrap();
    let names = |snap: dir::Snapshot| -> Vec<String> {
        snap.objects
            .services
            .keys()
            .map(|k| k.name.clone())
            .collect()
    };
    let mut plain = dir::DirSource::new(&tmp);
    let mut ahead = dir::DirSource::new(&tmp);
    ahead.prefetch();
    assert_eq!(
        names(ahead.poll().unwrap().unwrap()),
        names(plain.poll().unwrap().unwrap())
    );
    assert!(ahead.poll().unwrap().is_none(), "no change, no snapshot");

    let mut ahead = dir::DirSource::new(&tmp);
    ahead.prefetch();
    // Changed (another length) and removed after the read-ahead.
    std::fs::write(tmp.join("a"), svc("a-changed")).unwrap();
    std::fs::remove_file(tmp.join("b")).unwrap();
    assert_eq!(names(ahead.poll().unwrap().unwrap()), ["a-changed"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

mod property {
    use proptest::prelude::*;

    use super::*;

    /// One random Service: port count, type selector, selector-less,
    /// endpoints as (address suffix, condition selector).
    type SvcSpec = (u8, u8, bool, Vec<(u8, u8)>);

    /// A random cluster: services with 1-2 ports, slices or Endpoints,
    /// endpoints drawn from a small address pool so they are shared.
    fn cluster_yaml(spec: &[SvcSpec]) -> String {
        let mut y = String::new();
        for (i, (ports, node_port, selectorless, eps)) in spec.iter().enumerate() {
            // The byte's bits pick the type and the features: policies,
            // affinity, a LoadBalancer guarded by source ranges.
            let bit = |b: u8| node_port >> b & 1 == 1;
            let ty = match (bit(0), bit(4)) {
                (false, false) => "NodePort",
                (false, true) => "LoadBalancer",
                _ => "ClusterIP",
            };
            let mut features = String::new();
            if ty != "ClusterIP" && bit(1) {
                features += "  externalTrafficPolicy: Local\n";
            }
            if bit(2) {
                features += "  sessionAffinity: ClientIP\n";
            }
            if bit(3) {
                features += "  internalTrafficPolicy: Local\n";
            }
            if ty == "LoadBalancer" {
                features += "  loadBalancerSourceRanges: [192.168.0.0/16]\n";
            }
            y += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  type: {ty}\n  clusterIP: 10.96.0.{}\n{features}  ports:\n",
                i + 1
            );
            for p in 0..*ports {
                let np = if ty != "ClusterIP" {
                    format!(", nodePort: {}", 30000 + i * 4 + p as usize)
                } else {
                    String::new()
                };
                y += &format!("  - {{name: p{p}, port: {}{np}}}\n", 80 + p as u16);
            }
            if ty == "LoadBalancer" {
                y += &format!(
                    "status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.{}}}]}}}}\n",
                    i + 1
                );
            }
            if *selectorless {
                y += &format!(
                    "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: s{i}, namespace: ns}}\nsubsets:\n"
                );
                for (addr, _) in eps {
                    y += &format!(
                        "- addresses: [{{ip: 10.244.0.{addr}}}]\n  ports: [{{name: p0, port: 8080}}, {{name: p1, port: 8081}}]\n"
                    );
                }
            } else {
                y += &format!(
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-x, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p0, port: 8080}}, {{name: p1, port: 8081}}]\nendpoints:\n"
                );
                for (addr, cond) in eps {
                    let c = match cond % 3 {
                        0 => "{ready: true}",
                        1 => "{ready: false, serving: true, terminating: true}",
                        _ => "{ready: false}",
                    };
                    y += &format!(
                        "- {{addresses: [10.244.0.{addr}], conditions: {c}, nodeName: node-{}}}\n",
                        if addr % 2 == 0 { "a" } else { "b" }
                    );
                }
            }
        }
        y
    }

    fn cluster() -> impl Strategy<Value = Vec<SvcSpec>> {
        prop::collection::vec(
            (
                1u8..=2,
                any::<u8>(),
                any::<bool>(),
                prop::collection::vec((1u8..12, any::<u8>()), 0..6),
            ),
            0..5,
        )
    }

    /// The maps after every single write: what a packet meets at that
    /// moment. Collects what would send it nowhere.
    #[derive(Debug, Default)]
    struct Checked {
        inner: InMemory,
        broken: Vec<String>,
    }

    impl crate::agent::apply::MapWriter for Checked {
        fn apply(
            &mut self,
            op: &crate::agent::state::Op,
        ) -> Result<(), crate::agent::apply::MapError> {
            self.inner.apply(op)?;
            if let Some(why) = dangling(&self.inner.state) {
                self.broken.push(format!("after {op:?}: {why}"));
            }
            Ok(())
        }

        fn read(&self) -> Result<MapState, crate::agent::apply::MapError> {
            self.inner.read()
        }
    }

    /// What in `s` a lookup chain would find missing: a frontend whose
    /// address is not admitted, a slot or backend it reads, the internal
    /// entry its flag points at, the source ranges it is guarded by; a
    /// service backend entry of a backend that is gone.
    fn dangling(s: &MapState) -> Option<String> {
        use lb_common::service::*;
        for (k, f) in &s.frontends {
            if !s.addrs.contains_key(&k.addr) {
                return Some(format!("frontend {k:?} without its address"));
            }
            for slot in 0..f.count as u32 {
                let id = s.slot(f.backend_set, slot);
                if id.is_none_or(|id| !s.backends.contains_key(&id)) {
                    return Some(format!(
                        "frontend {k:?} reads a missing slot {slot} or its backend"
                    ));
                }
            }
            if f.flags & FE_TWO_SCOPES != 0
                && !s.frontends.contains_key(&Frontend4Key {
                    scope: SCOPE_INTERNAL,
                    ..*k
                })
            {
                return Some(format!("frontend {k:?} points at a missing internal entry"));
            }
            if f.flags & FE_SOURCE_RANGES != 0
                && !s.source_ranges.keys().any(|r| r.service_id == f.service_id)
            {
                return Some(format!("frontend {k:?} guarded by no range"));
            }
        }
        s.svc_backends
            .keys()
            .find(|k| !s.backends.contains_key(&k.backend_id))
            .map(|k| format!("service backend {k:?} of a missing backend"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Make-before-break, checked after every single write of any
        /// sequence of cluster states (with features: traffic policies,
        /// affinity, source ranges), including sequences cut short by
        /// failed writes and resumed: at no moment does a frontend read
        /// anything that is not there.
        #[test]
        fn every_write_leaves_maps_a_packet_can_use(
            steps in prop::collection::vec(cluster(), 1..6),
            one_in in 2u64..8,
            seed in any::<u64>(),
        ) {
            let n = node();
            let mut rec = Reconciler::adopt(Faulty::new(Checked::default(), one_in, seed)).unwrap();
            for step in &steps {
                let desired = model::translate(&objects(&cluster_yaml(step)), &n);
                prop_assert!(desired.errors.is_empty(), "{:?}", desired.errors);
                let _ = rec.reconcile(&desired);
            }
            let last = model::translate(&objects(&cluster_yaml(steps.last().unwrap())), &n);
            let mut tries = 0;
            while rec.reconcile(&last).is_err() {
                tries += 1;
                prop_assert!(tries < 1000, "never converged");
            }
            let broken = &rec.writer.inner.broken;
            prop_assert!(broken.is_empty(), "{}", broken.join("\n"));
            let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
            fresh.reconcile(&last).unwrap();
            prop_assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
        }

        /// Any sequence of cluster states, written through a writer that
        /// fails one write in `one_in`, retried until a sync succeeds,
        /// leaves maps that forward exactly like a fresh sync of the final
        /// state, with nothing dangling.
        #[test]
        fn any_sequence_converges_despite_faults(
            steps in prop::collection::vec(cluster(), 1..6),
            one_in in 2u64..8,
            seed in any::<u64>(),
        ) {
            let n = node();
            let mut rec = Reconciler::adopt(Faulty::new(InMemory::default(), one_in, seed)).unwrap();
            for step in &steps {
                let desired = model::translate(&objects(&cluster_yaml(step)), &n);
                prop_assert!(desired.errors.is_empty(), "{:?}", desired.errors);
                // Some steps are abandoned half-written, as when the next
                // change arrives before a retry.
                let _ = rec.reconcile(&desired);
            }
            let last = model::translate(&objects(&cluster_yaml(steps.last().unwrap())), &n);
            let mut tries = 0;
            while rec.reconcile(&last).is_err() {
                tries += 1;
                prop_assert!(tries < 1000, "never converged");
            }
            let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
            fresh.reconcile(&last).unwrap();
            prop_assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
            // What the reconciler believes is what the maps hold.
            prop_assert_eq!(&rec.state(), &rec.writer.inner.state);
            // And a converged agent writes nothing more.
            prop_assert_eq!(rec.reconcile(&last).unwrap().writes, 0);
        }

        /// The same through the store, one object event at a time, as the
        /// watchers deliver them: only dirty Services are translated and
        /// only touched keys written, and the maps still end up forwarding
        /// exactly like a fresh full sync.
        #[test]
        fn object_events_converge_despite_faults(
            steps in prop::collection::vec(cluster(), 1..6),
            one_in in 2u64..8,
            seed in any::<u64>(),
        ) {
            let n = node();
            let mut store = Store::default();
            let mut rec = Reconciler::adopt(Faulty::new(InMemory::default(), one_in, seed)).unwrap();
            for step in &steps {
                feed(&mut store, &objects(&cluster_yaml(step)));
                stage(&mut store, &mut rec, &n);
                let _ = rec.flush();
            }
            let mut tries = 0;
            while rec.flush().is_err() {
                tries += 1;
                prop_assert!(tries < 1000, "never converged");
            }
            let last = model::translate(&objects(&cluster_yaml(steps.last().unwrap())), &n);
            let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
            fresh.reconcile(&last).unwrap();
            prop_assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
            prop_assert_eq!(&rec.state(), &rec.writer.inner.state);
            prop_assert_eq!(&rec.state(), rec.target());
            prop_assert_eq!(rec.flush().unwrap().writes, 0);
            // A restart onto these maps adopts them with no write.
            let mut again = Reconciler::adopt(InMemory { state: rec.state(), writes: 0 }).unwrap();
            prop_assert_eq!(again.reconcile(&last).unwrap().writes, 0);
        }
    }
}

/// The backends a frontend entry gives new flows to, by address.
fn frontend_backends(s: &MapState, addr: [u8; 4], port: u16, scope: u8) -> (Vec<String>, u16) {
    use lb_common::service::Frontend4Key;
    let f = s
        .frontends
        .get(&Frontend4Key {
            addr: lb_common::ip4(addr),
            port: lb_common::port(port),
            proto: lb_common::PROTO_TCP,
            scope,
        })
        .unwrap_or_else(|| panic!("no frontend {addr:?}:{port} scope {scope} in\n{}", s.dump()));
    let mut out: Vec<String> = (0..f.count as u32)
        .map(|slot| {
            let id = s.slot(f.backend_set, slot).expect("slot");
            Ipv4Addr::from(ip4_octets(s.backends[&id].addr)).to_string()
        })
        .collect();
    out.sort();
    (out, f.flags)
}

#[test]
fn traffic_policies_affinity_and_reject_become_frontend_entries() {
    use lb_common::service::*;
    let local = WEB
        .replace(
            "  type: NodePort\n",
            "  type: NodePort\n  externalTrafficPolicy: Local\n  sessionAffinity: ClientIP\n",
        )
        .replace(
            "{ready: false}, nodeName: node-b",
            "{ready: true}, nodeName: node-a",
        );
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&model::translate(&objects(&local), &node()))
        .unwrap();
    let st = rec.writer.state.clone();
    // From outside, the NodePort and the external IP reach this node's two
    // ready endpoints; from inside (SCOPE_INTERNAL) every ready one, as
    // the ClusterIP does.
    let mine = vec!["10.244.1.11".to_string(), "10.244.2.14".to_string()];
    let all = vec![
        "10.244.1.11".to_string(),
        "10.244.2.12".to_string(),
        "10.244.2.14".to_string(),
    ];
    for addr in [[172, 18, 0, 2], [203, 0, 113, 9]] {
        let port = if addr[0] == 172 { 30080 } else { 80 };
        let (b, flags) = frontend_backends(&st, addr, port, SCOPE_ALL);
        assert_eq!(b, mine);
        assert_eq!(
            flags,
            FE_TWO_SCOPES | FE_LOCAL_LIST | FE_EXTERNAL_LOCAL | FE_AFFINITY_CLIENT_IP
        );
        let (b, flags) = frontend_backends(&st, addr, port, SCOPE_INTERNAL);
        assert_eq!(b, all);
        assert_eq!(flags, FE_EXTERNAL_LOCAL | FE_AFFINITY_CLIENT_IP);
    }
    let (b, flags) = frontend_backends(&st, [10, 96, 0, 10], 80, SCOPE_ALL);
    assert_eq!(
        (b, flags),
        (all.clone(), FE_EXTERNAL_LOCAL | FE_AFFINITY_CLIENT_IP)
    );
    // Affinity reads what each backend is to the port (canonical() checks
    // it against the slots).
    canonical(&st);

    // No endpoint on this node: outside traffic finds none (dropped), the
    // Service still has endpoints (no reject flag).
    let remote = local.replace("nodeName: node-a", "nodeName: node-b");
    rec.reconcile(&model::translate(&objects(&remote), &node()))
        .unwrap();
    let st = rec.writer.state.clone();
    let (b, flags) = frontend_backends(&st, [172, 18, 0, 2], 30080, SCOPE_ALL);
    assert!(b.is_empty());
    assert_eq!(flags & FE_REJECT_NO_BACKEND, 0);
    canonical(&st);

    let plain = remote.replace("  sessionAffinity: ClientIP\n", "");
    rec.reconcile(&model::translate(&objects(&plain), &node()))
        .unwrap();
    canonical(&rec.writer.state);

    // No endpoint at all: every frontend rejects.
    let none = plain
        .replace("ready: true", "ready: false")
        .replace("serving: true", "serving: false");
    let d = model::translate(&objects(&none), &node());
    rec.reconcile(&d).unwrap();
    let st = rec.writer.state.clone();
    for f in st.frontends.values() {
        assert_eq!(f.count, 0);
        assert_ne!(f.flags & FE_REJECT_NO_BACKEND, 0, "{}", st.dump());
    }
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    // WEB's http port: two ready endpoints, one terminating. Without the
    // ready ones, new flows go to the terminating one and the frontend
    // says so (lbctl shows it).
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&model::translate(&objects(WEB), &node()))
        .unwrap();
    let st = rec.writer.state.clone();
    let (b, _) = frontend_backends(&st, [10, 96, 0, 10], 80, 0);
    assert_eq!(b, ["10.244.1.11", "10.244.2.12"]);
    // The terminating backend stays in the maps for its flows.
    assert!(
        st.backends
            .values()
            .any(|b| b.addr == lb_common::ip4([10, 244, 2, 13]))
    );
    let draining = WEB.replace("conditions: {ready: true}", "conditions: {ready: false}");
    rec.reconcile(&model::translate(&objects(&draining), &node()))
        .unwrap();
    let st = rec.writer.state.clone();
    let (b, _) = frontend_backends(&st, [10, 96, 0, 10], 80, 0);
    assert_eq!(b, ["10.244.2.13"]);
    let f = st.frontends.values().next().unwrap();
    assert_eq!(f.terminating, f.count, "{}", st.dump());
    canonical(&st);
}

#[test]
fn maps_of_an_older_agent_get_service_backends_before_the_first_flush() {
    use lb_common::service::{SB_SERVING, ServiceBackendKey};
    let objs = objects(WEB);
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&model::translate(&objs, &node())).unwrap();
    let want = rec.writer.state.clone();
    // What an agent without LB_SVC_BACKENDS_V1 left.
    let mut old = want.clone();
    old.svc_backends.clear();
    let mut rec = Reconciler::adopt(InMemory {
        state: old,
        writes: 0,
    })
    .unwrap();
    assert!(rec.migrate_service_backends().unwrap() > 0);
    let st = rec.writer.state.clone();
    for f in st.frontends.values() {
        for (set, _, id) in st.slot_entries() {
            if set == f.backend_set {
                let sb = st.svc_backends.get(&ServiceBackendKey {
                    service_id: f.service_id,
                    backend_id: id,
                });
                assert!(sb.is_some_and(|v| v & SB_SERVING != 0), "{}", st.dump());
            }
        }
    }
    assert_eq!(rec.migrate_service_backends().unwrap(), 0, "twice");
    // The first pass makes them exactly what a fresh agent writes.
    rec.reconcile(&model::translate(&objs, &node())).unwrap();
    assert_eq!(rec.writer.state, want);
}

#[test]
fn source_ranges_guard_load_balancer_ips_only() {
    use lb_common::service::FE_SOURCE_RANGES;
    let lb = |ranges: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: x}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{port: 80, nodePort: 30080}}]
status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.1}}]}}}}
"#
        )
    };
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&model::translate(
        &objects(&lb("10.1.2.3/16, 2001:db8::/32")),
        &node(),
    ))
    .unwrap();
    let st = rec.writer.state.clone();
    // Host bits cleared, IPv6 left out; only the LoadBalancer IP is
    // guarded (NodePorts are not subject to the ranges, as in kube-proxy).
    let ranges: Vec<String> = st
        .source_ranges
        .keys()
        .map(|k| format!("{}/{}", Ipv4Addr::from(ip4_octets(k.addr)), k.prefix_len))
        .collect();
    assert_eq!(ranges, ["10.1.0.0/16"]);
    for (k, f) in &st.frontends {
        let guarded = f.flags & FE_SOURCE_RANGES != 0;
        assert_eq!(
            guarded,
            k.addr == lb_common::ip4([192, 0, 2, 1]),
            "{}",
            st.dump()
        );
    }
    // A range holding the node's address lets the VIP itself in too.
    rec.reconcile(&model::translate(&objects(&lb("172.18.0.0/24")), &node()))
        .unwrap();
    assert_eq!(
        rec.writer.state.source_ranges.len(),
        2,
        "{}",
        rec.writer.state.dump()
    );
    // Without ranges: nothing guarded, nothing left.
    rec.reconcile(&model::translate(&objects(&lb("")), &node()))
        .unwrap();
    let st = &rec.writer.state;
    assert!(st.source_ranges.is_empty());
    assert!(
        st.frontends
            .values()
            .all(|f| f.flags & FE_SOURCE_RANGES == 0)
    );
}

/// A Service port that would take a map past `--lb-map-max` is refused
/// whole, by name, naming the map and the flag; the ports that fit are
/// programmed, and an update of a programmed port near the limit still
/// fits (its old entries are counted out).
#[test]
fn a_port_that_does_not_fit_is_refused_by_name_and_the_rest_stays() {
    let n = node();
    // 16 backends fit: the first Service (10 endpoints) and not the
    // second (10 more); the third (6) takes the rest, as the ids the
    // refused second was given went back at once (backend ids index an
    // array of 16).
    let mut yaml = big_cluster(2);
    yaml += "---\napiVersion: v1\nkind: Service\nmetadata: {name: s2, namespace: ns}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s2-x, namespace: ns, labels: {kubernetes.io/service-name: s2}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n";
    for e in 1..=6 {
        yaml += &format!("- {{addresses: [10.99.0.{e}]}}\n");
    }
    let objs = objects(&yaml);
    let mut store = Store::default();
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.set_capacity(super::reconcile::Capacity {
        lb_map_max: 16,
        maglev_chunks: 0,
    });
    feed(&mut store, &objs);
    let mut refused = Vec::new();
    for c in store.take_changes(&n) {
        if let Err(e) = rec.set_service(&c.service, c.ports.unwrap()) {
            refused.push((c.service.to_string(), e.to_string()));
        }
    }
    assert_eq!(
        refused,
        vec![(
            "ns/s1".to_string(),
            "map LB4_BACKENDS_V1 is full: 20 entries needed, 16 fit (raise --lb-map-max)"
                .to_string()
        )]
    );
    rec.flush().unwrap();
    assert_eq!(rec.port_count(), 2);
    assert_eq!(rec.state().backends.len(), 16);
    assert!(rec.state().frontends.len() == 2, "{}", rec.state().dump());
    assert_eq!(
        rec.state().backends.keys().copied().collect::<Vec<_>>(),
        (1..=16).collect::<Vec<u32>>()
    );

    // Room made (the first and third Services deleted): the refused one, translated
    // again (the agent marks it dirty after a flush that wrote), fits.
    let mut only_second = objs.clone();
    for s in ["s0", "s2"] {
        only_second.services.remove(&model::ObjKey::new("ns", s));
        only_second
            .slices
            .remove(&model::ObjKey::new("ns", format!("{s}-x")));
    }
    feed(&mut store, &only_second);
    stage(&mut store, &mut rec, &n);
    rec.flush().unwrap();
    assert_eq!(rec.port_count(), 0);
    store.mark_dirty(model::ObjKey::new("ns", "s1"));
    stage(&mut store, &mut rec, &n);
    rec.flush().unwrap();
    assert_eq!(rec.port_count(), 1);
    let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
    fresh
        .reconcile(&model::translate(&only_second, &n))
        .unwrap();
    assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
}

/// Two Services of 5,000 endpoints each: a flush writes each map in
/// chunks (`FLUSH_CHUNK`), and write failures in the middle of a chunk
/// leave the maps where the next flush goes on from.
#[test]
fn a_flush_larger_than_a_chunk_lands_whole_despite_faults() {
    let mut yaml = String::new();
    for s in 0..2 {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: big{s}, namespace: demo}}\nspec:\n  clusterIP: 10.96.1.{s}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big{s}-1, namespace: demo, labels: {{kubernetes.io/service-name: big{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for i in 0..5000 {
            yaml += &format!(
                "- {{addresses: [10.{}.{}.{}], conditions: {{ready: true}}, nodeName: node-a}}\n",
                200 + s,
                i / 250,
                i % 250 + 1
            );
        }
    }
    let desired = model::translate(&objects(&yaml), &node());
    let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
    let o = fresh.reconcile(&desired).unwrap();
    assert_eq!(fresh.state().backends.len(), 10_000);
    assert_eq!(o.writes, fresh.state().entries());

    let mut rec = Reconciler::adopt(Faulty::new(InMemory::default(), 3000, 7)).unwrap();
    let mut tries = 0;
    while rec.reconcile(&desired).is_err() {
        tries += 1;
        assert!(tries < 100, "no progress");
    }
    assert!(rec.writer.injected > 0, "faults were injected");
    assert_eq!(canonical(&rec.state()), canonical(&fresh.state()));
    assert_eq!(
        rec.state(),
        rec.writer.inner.state,
        "the maps as the agent sees them"
    );
}

/// Until its first flush an agent records nothing of the maps beyond what
/// it found in them (`Kept::Whole`): when that flush fails part way, what
/// landed is read back, so entries the next target drops are deleted, not
/// left behind. For a failure at every write of the first flush, on empty
/// maps and restarted on full ones.
#[test]
fn a_first_flush_cut_short_on_empty_maps_leaves_nothing_behind() {
    /// Fails the `at`th write, once.
    #[derive(Debug, Default)]
    struct FailOnce {
        inner: InMemory,
        at: usize,
        seen: usize,
    }
    impl crate::agent::apply::MapWriter for FailOnce {
        fn apply(
            &mut self,
            op: &crate::agent::state::Op,
        ) -> Result<(), crate::agent::apply::MapError> {
            self.seen += 1;
            if self.seen == self.at {
                return Err(crate::agent::apply::MapError::Injected(Box::new(
                    op.clone(),
                )));
            }
            self.inner.apply(op)
        }
        fn read(&self) -> Result<MapState, crate::agent::apply::MapError> {
            self.inner.read()
        }
    }
    let svc = |s: &str, ip: &str, ep: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {s}, namespace: demo}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {s}-1, namespace: demo, labels: {{kubernetes.io/service-name: {s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- {{addresses: [{ep}], conditions: {{ready: true}}, nodeName: node-b}}\n"
        )
    };
    let (a, b) = (
        svc("a", "10.96.0.10", "10.244.1.5"),
        svc("b", "10.96.0.11", "10.244.2.5"),
    );
    let both = model::translate(&objects(&(a.clone() + &b)), &node());
    let only_b = model::translate(&objects(&b), &node());
    let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
    let total = fresh.reconcile(&both).unwrap().writes;
    let mut fresh_b = Reconciler::adopt(InMemory::default()).unwrap();
    fresh_b.reconcile(&only_b).unwrap();
    for at in 1..=total {
        let writer = FailOnce {
            at,
            ..Default::default()
        };
        let mut rec = Reconciler::adopt(writer).unwrap();
        assert!(rec.reconcile(&both).is_err(), "write {at} fails");
        rec.reconcile(&only_b).unwrap();
        assert_eq!(
            canonical(&rec.writer.inner.state),
            canonical(&fresh_b.state()),
            "failed at write {at} of {total}"
        );
        assert_eq!(
            rec.state(),
            rec.writer.inner.state,
            "as the agent sees them"
        );
    }
    // Restarted on maps holding both: the first flush (a goes) fails at
    // each of its writes, then the next target (a back) is reached.
    let mut b_only = Reconciler::adopt(fresh.writer.clone()).unwrap();
    let dropped = b_only.reconcile(&only_b).unwrap().writes;
    assert!(dropped > 0);
    for at in 1..=dropped {
        let writer = FailOnce {
            inner: fresh.writer.clone(),
            at,
            ..Default::default()
        };
        let mut rec = Reconciler::adopt(writer).unwrap();
        assert!(rec.reconcile(&only_b).is_err(), "write {at} fails");
        rec.reconcile(&both).unwrap();
        assert_eq!(
            canonical(&rec.writer.inner.state),
            canonical(&fresh.state()),
            "restarted, failed at write {at} of {dropped}"
        );
        assert_eq!(
            rec.state(),
            rec.writer.inner.state,
            "as the agent sees them"
        );
    }
}

/// One Service of `n` endpoints, as `big_cluster` writes them.
fn service_of(n: usize) -> String {
    let mut y = String::from(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: wide, namespace: ns}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: wide-x, namespace: ns, labels: {kubernetes.io/service-name: wide}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n",
    );
    if n == 0 {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    for e in 0..n {
        y += &format!("- {{addresses: [10.100.{}.{}]}}\n", e / 250, e % 250 + 1);
    }
    y
}

#[test]
fn a_backend_set_takes_one_entry_per_sixteen_slots() {
    let n = node();
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    for size in [40, 17, 16, 33, 1, 0, 20] {
        let desired = model::translate(&objects(&service_of(size)), &n);
        rec.reconcile(&desired).unwrap();
        let st = rec.state();
        let fe = st
            .frontends
            .values()
            .find(|f| f.flags & lb_common::service::FE_LOCAL_LIST == 0)
            .expect("the ClusterIP frontend");
        assert_eq!(usize::from(fe.count), size);
        // The chunks of every set the maps hold: ceil(size / 16) for this
        // one, each slot below the count names a backend, none above.
        assert_eq!(st.slots.len(), size.div_ceil(16), "{}", st.dump());
        let mut addrs = BTreeSet::new();
        for slot in 0..fe.count as u32 {
            let id = st.slot(fe.backend_set, slot).expect("slot");
            addrs.insert(st.backends[&id].addr);
        }
        assert_eq!(addrs.len(), size, "every endpoint in a slot");
        assert_eq!(st.slot(fe.backend_set, fe.count as u32), None);
        assert_eq!(st.slot_entries().count(), size);
        // The same as an agent that starts from these objects.
        let mut fresh = Reconciler::adopt(InMemory::default()).unwrap();
        fresh.reconcile(&desired).unwrap();
        assert_eq!(canonical(&st), canonical(&fresh.state()));
    }
}

/// A NodePort Service of `n` endpoints with `annotations` (YAML flow
/// mapping entries).
fn shop(n: usize, annotations: &str) -> String {
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: shop, namespace: ns, annotations: {{{annotations}}}}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports: [{{port: 80, nodePort: 30020}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: shop-x, namespace: ns, labels: {{kubernetes.io/service-name: shop}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n"
    );
    for e in 0..n {
        y += &format!("- {{addresses: [10.244.1.{}], nodeName: node-b}}\n", e + 11);
    }
    y
}

/// The backend addresses of a frontend's set, slot by slot.
fn table_of(
    s: &MapState,
    addr: [u8; 4],
    port: u16,
) -> (Vec<Ipv4Addr>, lb_common::service::Frontend) {
    use lb_common::service::{Frontend4Key, SCOPE_ALL};
    let f = s.frontends[&Frontend4Key {
        addr: lb_common::ip4(addr),
        port: lb_common::port(port),
        proto: lb_common::PROTO_TCP,
        scope: SCOPE_ALL,
    }];
    let t = (0..u32::from(f.count))
        .map(|slot| {
            let id = s
                .slot(f.backend_set, slot)
                .expect("every slot names a backend");
            Ipv4Addr::from(ip4_octets(s.backends[&id].addr))
        })
        .collect();
    (t, f)
}

/// Two agents whose nodes have other addresses and that gave the backends
/// other ids build the same Maglev table of backends: a flow gets the
/// same backend on either node (the device path hashes it without the
/// node's address, `hash::maglev4`).
#[test]
fn maglev_tables_are_the_same_on_every_node() {
    use lb_common::service::*;
    let mut a = node();
    a.balancing.table_size = 251;
    let mut b = a.clone();
    b.name = "node-c".into();
    b.addresses = vec![Ipv4Addr::new(172, 18, 0, 3)];
    let yaml = shop(5, "lbctl.dev/lb-algorithm: maglev");
    let mut rec_a = Reconciler::adopt(InMemory::default()).unwrap();
    rec_a
        .reconcile(&model::translate(&objects(&yaml), &a))
        .unwrap();
    // Node c saw other backends first: the same endpoints get other ids.
    let mut rec_b = Reconciler::adopt(InMemory::default()).unwrap();
    rec_b
        .reconcile(&model::translate(&objects(&service_of(7)), &b))
        .unwrap();
    let both = format!("{}{}", service_of(7), yaml);
    rec_b
        .reconcile(&model::translate(&objects(&both), &b))
        .unwrap();

    let (ta, fa) = table_of(&rec_a.writer.state, [172, 18, 0, 2], 30020);
    let (tb, fb) = table_of(&rec_b.writer.state, [172, 18, 0, 3], 30020);
    assert_ne!(fa.backend_set, 0);
    assert_eq!((fa.count, fa.backends), (251, 5));
    assert_eq!(fa.flags & FE_MAGLEV, FE_MAGLEV);
    assert_eq!((fb.count, fb.backends), (251, 5));
    let id_of = |st: &MapState| {
        let a = lb_common::ip4([10, 244, 1, 11]);
        st.backends
            .iter()
            .find(|(_, b)| b.addr == a)
            .map(|(id, _)| *id)
    };
    assert_ne!(id_of(&rec_a.writer.state), id_of(&rec_b.writer.state));
    assert_eq!(ta, tb);
    // The ClusterIP reads the same table.
    assert_eq!(table_of(&rec_a.writer.state, [10, 96, 0, 20], 80).0, ta);
    // Each of the 5 holds 50 or 51 of the 251 slots.
    for e in 11..16 {
        let n = ta
            .iter()
            .filter(|x| **x == Ipv4Addr::new(10, 244, 1, e))
            .count();
        assert!((50..=51).contains(&n), "{e}: {n}");
    }
    canonical(&rec_a.writer.state);
    canonical(&rec_b.writer.state);

    // One endpoint leaves: its slots go to the others, and few others'
    // slots move.
    let four = yaml.replace("- {addresses: [10.244.1.13], nodeName: node-b}\n", "");
    rec_a
        .reconcile(&model::translate(&objects(&four), &a))
        .unwrap();
    let (after, f) = table_of(&rec_a.writer.state, [172, 18, 0, 2], 30020);
    assert_eq!(f.backends, 4);
    let gone = Ipv4Addr::new(10, 244, 1, 13);
    let moved = ta
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y && **x != gone)
        .count();
    assert!(
        moved * 50 < 251 * 2,
        "{moved} slots of staying backends moved"
    );
}

/// Weights set the shares, 0 drains (no new flows, flows stay), a weight
/// turns Maglev on; the global flag and the annotation choose the
/// algorithm; an unreadable annotation leaves the Service working with
/// the defaults and is shown as not enforced.
#[test]
fn weights_drain_and_the_algorithm_flag_and_annotation() {
    use lb_common::service::*;
    let mut n = node();
    n.balancing.table_size = 1021;
    let yaml = shop(
        3,
        "lbctl.dev/backend-weights: \"10.244.1.11=0, 10.244.1.12:8080=300, 10.244.9.9=5\"",
    );
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    rec.reconcile(&model::translate(&objects(&yaml), &n))
        .unwrap();
    let st = rec.writer.state.clone();
    let (t, f) = table_of(&st, [172, 18, 0, 2], 30020);
    assert_eq!(
        (f.count, f.backends, f.flags & FE_MAGLEV),
        (1021, 2, FE_MAGLEV)
    );
    let heavy = t
        .iter()
        .filter(|x| **x == Ipv4Addr::new(10, 244, 1, 12))
        .count();
    let light = t
        .iter()
        .filter(|x| **x == Ipv4Addr::new(10, 244, 1, 13))
        .count();
    assert_eq!(heavy + light, 1021);
    assert!((3 * light).abs_diff(heavy) < 20, "{heavy} vs {light}");
    // The drained one keeps its entry (its flows go on) without a list.
    let drained = st
        .svc_backends
        .iter()
        .find(|(k, _)| {
            Ipv4Addr::from(ip4_octets(st.backends[&k.backend_id].addr))
                == Ipv4Addr::new(10, 244, 1, 11)
        })
        .map(|(_, v)| *v);
    assert_eq!(drained, Some(SB_DRAINED | SB_SERVING));
    canonical(&st);

    // Weights under `hash`: 0 still drains, the rest is reported.
    let hash = yaml.replace(
        "annotations: {",
        "annotations: {lbctl.dev/lb-algorithm: hash, ",
    );
    rec.reconcile(&model::translate(&objects(&hash), &n))
        .unwrap();
    let st = rec.writer.state.clone();
    let (t, f) = table_of(&st, [172, 18, 0, 2], 30020);
    assert_eq!((f.count, f.flags & FE_MAGLEV), (2, 0));
    assert!(!t.contains(&Ipv4Addr::new(10, 244, 1, 11)));
    let meta = st.service_meta.values().next().unwrap();
    assert_eq!(meta.not_enforced, NE_WEIGHTS_WITHOUT_MAGLEV);

    // The global flag turns Maglev on; the annotation turns it off.
    let mut m = n.clone();
    m.balancing.maglev = true;
    let plain = shop(3, "");
    rec.reconcile(&model::translate(&objects(&plain), &m))
        .unwrap();
    let (_, f) = table_of(&rec.writer.state, [10, 96, 0, 20], 80);
    assert_eq!(
        (f.count, f.backends, f.flags & FE_MAGLEV),
        (1021, 3, FE_MAGLEV)
    );
    let off = shop(3, "lbctl.dev/lb-algorithm: hash");
    rec.reconcile(&model::translate(&objects(&off), &m))
        .unwrap();
    let (_, f) = table_of(&rec.writer.state, [10, 96, 0, 20], 80);
    assert_eq!((f.count, f.flags & FE_MAGLEV), (3, 0));

    // A typo: programmed with the defaults, shown as not enforced.
    for bad in [
        "lbctl.dev/lb-algorithm: magleb",
        "lbctl.dev/backend-weights: \"10.244.1.11=lots\"",
        "lbctl.dev/backend-weights: \"10.244.1.11=10001\"",
    ] {
        let d = model::translate(&objects(&shop(3, bad)), &n);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        rec.reconcile(&d).unwrap();
        let st = rec.writer.state.clone();
        let (_, f) = table_of(&st, [172, 18, 0, 2], 30020);
        assert_eq!((f.count, f.flags & FE_MAGLEV), (3, 0), "{bad}");
        let meta = st.service_meta.values().next().unwrap();
        assert_eq!(meta.not_enforced, NE_LB_ANNOTATION, "{bad}");
    }
}

/// Direct server return: the global flag and the annotation choose it;
/// it marks the frontends reached from outside (NodePort here), never
/// the ClusterIP; `hybrid` is DSR for TCP and SNAT for UDP; a typo leaves
/// the defaults, shown as not enforced.
#[test]
fn dsr_by_flag_and_annotation_on_outside_frontends_only() {
    use lb_common::service::*;
    let yaml = |annotations: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: ns, annotations: {{{annotations}}}}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.53\n  ports: [{{name: tcp, port: 53, nodePort: 30053}}, {{name: udp, port: 53, protocol: UDP, nodePort: 30053}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dns-x, namespace: ns, labels: {{kubernetes.io/service-name: dns}}}}\naddressType: IPv4\nports: [{{name: tcp, port: 53}}, {{name: udp, port: 53, protocol: UDP}}]\nendpoints:\n- {{addresses: [10.244.1.11], nodeName: node-b}}\n"
        )
    };
    let flags = |st: &MapState, addr: [u8; 4], port: u16, proto: u8| {
        st.frontends[&Frontend4Key {
            addr: lb_common::ip4(addr),
            port: lb_common::port(port),
            proto,
            scope: SCOPE_ALL,
        }]
            .flags
            & FE_DSR
    };
    let (tcp, udp) = (lb_common::PROTO_TCP, lb_common::PROTO_UDP);
    // (NodePort TCP, NodePort UDP, ClusterIP TCP) under each setting.
    let dsr_of = |st: &MapState| {
        (
            flags(st, [172, 18, 0, 2], 30053, tcp) != 0,
            flags(st, [172, 18, 0, 2], 30053, udp) != 0,
            flags(st, [10, 96, 0, 53], 53, tcp) != 0,
        )
    };
    let mut rec = Reconciler::adopt(InMemory::default()).unwrap();
    let mut n = node();
    for (mode, annotations, want, ne) in [
        (model::LbMode::Snat, "", (false, false, false), 0),
        (model::LbMode::Dsr, "", (true, true, false), 0),
        (model::LbMode::Hybrid, "", (true, false, false), 0),
        (
            model::LbMode::Snat,
            "lbctl.dev/lb-mode: dsr",
            (true, true, false),
            0,
        ),
        (
            model::LbMode::Dsr,
            "lbctl.dev/lb-mode: snat",
            (false, false, false),
            0,
        ),
        (
            model::LbMode::Snat,
            "lbctl.dev/lb-mode: hybrid",
            (true, false, false),
            0,
        ),
        (
            model::LbMode::Hybrid,
            "lbctl.dev/lb-mode: direct",
            (true, false, false),
            NE_LB_ANNOTATION,
        ),
    ] {
        n.balancing.mode = mode;
        let d = model::translate(&objects(&yaml(annotations)), &n);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        rec.reconcile(&d).unwrap();
        let st = rec.writer.state.clone();
        assert_eq!(dsr_of(&st), want, "{mode:?} {annotations:?}");
        for meta in st.service_meta.values() {
            assert_eq!(meta.not_enforced, ne, "{mode:?} {annotations:?}");
        }
        canonical(&st);
    }
}
