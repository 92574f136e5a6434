//! The test cluster's "cloud" load balancer, as cloud-provider-kind or
//! MetalLB stand in for one on a kind cluster: a small controller that
//! gives each Service of type LoadBalancer (no loadBalancerClass) an
//! address from a pool, writes it to `status.loadBalancer.ingress`, keeps
//! the cloud's cleanup finalizer, and routes the address to the nodes from
//! the network namespace it runs in (the LAN's router: where e2e.test
//! runs). As a cloud load balancer does, it health-checks the nodes: for
//! `externalTrafficPolicy: Local` the Service's healthCheckNodePort (only
//! nodes with a local endpoint answer 200), otherwise the proxy's
//! `/healthz` on 10256; the route's next hops are the nodes that pass (the
//! router spreads flows over them by their 5-tuple; a Service with
//! `sessionAffinity: ClientIP` is routed to one of them, as clouds give
//! the load balancer the Service's affinity).
//!
//! With `--src ADDR` (an address of this namespace), traffic from here to
//! the load balancer addresses leaves from ADDR, an address outside the
//! nodes' network, as a client on the internet would be: upstream tests
//! check that the source a backend sees is not one of the nodes' subnet.
//!
//! Usage: lb-cloud --kubeconfig FILE --pool 172.18.1.0/24 [--src ADDR]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

struct Pool {
    base: u32,
    size: u32,
}

impl Pool {
    fn parse(cidr: &str) -> Result<Self> {
        let (ip, len) = cidr.split_once('/').context("pool: ADDRESS/LENGTH")?;
        let ip: Ipv4Addr = ip.parse().context("pool address")?;
        let len: u32 = len.parse().context("pool length")?;
        if !(8..=30).contains(&len) {
            bail!("pool length {len}: between 8 and 30");
        }
        Ok(Self {
            base: u32::from(ip) & !((1u32 << (32 - len)) - 1),
            size: 1 << (32 - len),
        })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.base && v < self.base + self.size - 1
    }

    /// The lowest free host address.
    fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (1..self.size - 1)
            .map(|i| Ipv4Addr::from(self.base + i))
            .find(|ip| !used.contains(ip))
    }
}

/// A node's InternalIP.
fn node_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

/// GET http://ip:port/ answered 200 within a second.
fn healthy(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let addr = SocketAddr::from((ip, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

fn ip_route(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// The route to `ip` in this namespace: over every healthy node (ECMP),
/// or none.
fn set_route(
    ip: Ipv4Addr,
    via: &[Ipv4Addr],
    src: Option<Ipv4Addr>,
    routed: &mut BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
) {
    if routed.get(&ip).is_some_and(|v| v == via) {
        return;
    }
    let dst = format!("{ip}/32");
    if via.is_empty() {
        ip_route(&["route", "del", &dst]);
    } else {
        let mut args: Vec<String> = vec!["route".into(), "replace".into(), dst];
        if let Some(src) = src {
            args.extend(["src".into(), src.to_string()]);
        }
        for v in via {
            args.extend(["nexthop".into(), "via".into(), v.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ip_route(&args);
    }
    routed.insert(ip, via.to_vec());
}

fn handled(svc: &Service) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() == Some("LoadBalancer") && spec.load_balancer_class.is_none()
}

fn ingress_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .as_ref()?
        .parse()
        .ok()
}

async fn reconcile_once(
    client: &Client,
    pool: &Pool,
    src: Option<Ipv4Addr>,
    routed: &mut BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
) -> Result<()> {
    let services: Api<Service> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let node_ips: Vec<Ipv4Addr> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(node_ip)
        .collect();
    let list = services.list(&ListParams::default()).await?;
    // Addresses held: those written to the status of Services we handle.
    let mut used: BTreeSet<Ipv4Addr> = list
        .items
        .iter()
        .filter(|s| handled(s) && s.metadata.deletion_timestamp.is_none())
        .filter_map(ingress_ip)
        .filter(|ip| pool.contains(*ip))
        .collect();
    let mut wanted: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for svc in &list.items {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let api: Api<Service> = Api::namespaced(client.clone(), &ns);
        let finalizers = svc.metadata.finalizers.clone().unwrap_or_default();
        let has_finalizer = finalizers.iter().any(|f| f == FINALIZER);
        if svc.metadata.deletion_timestamp.is_some() || !handled(svc) {
            // Gone or no longer ours: the address is released (its route
            // goes below), the status cleared, the finalizer removed.
            if !handled(svc) && ingress_ip(svc).is_some_and(|ip| pool.contains(ip)) {
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        serde_json::json!({"status": {"loadBalancer": {"ingress": null}}}),
                    ),
                )
                .await
                .with_context(|| format!("clearing {ns}/{name}'s status"))?;
            }
            if has_finalizer {
                let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"finalizers": rest}})),
                )
                .await
                .with_context(|| format!("removing {ns}/{name}'s finalizer"))?;
            }
            continue;
        }
        if !has_finalizer {
            let mut all = finalizers.clone();
            all.push(FINALIZER.to_string());
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"finalizers": all}})),
            )
            .await
            .with_context(|| format!("adding {ns}/{name}'s finalizer"))?;
        }
        let ip = match ingress_ip(svc).filter(|ip| pool.contains(*ip)) {
            Some(ip) => ip,
            None => {
                let Some(ip) = pool.allocate(&used) else {
                    eprintln!("lb-cloud: the pool is exhausted; {ns}/{name} waits");
                    continue;
                };
                used.insert(ip);
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": {"loadBalancer": {
                        "ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]
                    }}})),
                )
                .await
                .with_context(|| format!("writing {ns}/{name}'s status"))?;
                eprintln!("lb-cloud: {ns}/{name} is {ip}");
                ip
            }
        };
        wanted.insert(ip);
        let spec = svc.spec.as_ref().expect("handled");
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let mut via: Vec<Ipv4Addr> = node_ips
            .iter()
            .copied()
            .filter(|n| match (local, spec.health_check_node_port) {
                (true, Some(port)) => healthy(*n, port as u16, "/"),
                _ => healthy(*n, 10256, "/healthz"),
            })
            .collect();
        // Client-IP affinity at the load balancer too, as clouds configure
        // it from the Service: one client, one node (the router spreads
        // other flows by their 5-tuple).
        if spec.session_affinity.as_deref() == Some("ClientIP") {
            via.truncate(1);
        }
        set_route(ip, &via, src, routed);
    }
    let stale: Vec<Ipv4Addr> = routed
        .keys()
        .copied()
        .filter(|ip| !wanted.contains(ip))
        .collect();
    for ip in stale {
        set_route(ip, &[], src, routed);
        routed.remove(&ip);
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut kubeconfig = None;
    let mut pool = None;
    let mut src = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--kubeconfig" => kubeconfig = args.next(),
            "--pool" => pool = args.next(),
            "--src" => src = Some(args.next().context("--src ADDR")?.parse::<Ipv4Addr>()?),
            other => {
                bail!(
                    "unknown argument {other}; usage: lb-cloud --kubeconfig FILE --pool CIDR [--src ADDR]"
                )
            }
        }
    }
    let kubeconfig = kubeconfig.context("--kubeconfig FILE")?;
    let pool = Pool::parse(&pool.context("--pool CIDR")?)?;
    let kc = Kubeconfig::read_from(&kubeconfig).context("reading the kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let mut routed = BTreeMap::new();
    loop {
        if let Err(e) = reconcile_once(&client, &pool, src, &mut routed).await {
            eprintln!("lb-cloud: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_hands_out_its_host_addresses_lowest_first() {
        let pool = Pool::parse("172.18.1.0/30").unwrap();
        let mut used = BTreeSet::new();
        let a = pool.allocate(&used).unwrap();
        assert_eq!(a, Ipv4Addr::new(172, 18, 1, 1));
        used.insert(a);
        let b = pool.allocate(&used).unwrap();
        assert_eq!(b, Ipv4Addr::new(172, 18, 1, 2));
        used.insert(b);
        assert_eq!(
            pool.allocate(&used),
            None,
            "network and broadcast are never handed out"
        );
        assert!(!pool.contains(Ipv4Addr::new(172, 18, 1, 3)));
        assert!(pool.contains(Ipv4Addr::new(172, 18, 1, 2)));
        assert!(Pool::parse("172.18.1.0/31").is_err());
    }
}
