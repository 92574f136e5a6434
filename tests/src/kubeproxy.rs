//! kube-proxy's iptables and nftables rule sets, recreated as text for benchmarks.
//!
//! [`iptables_restore`] and [`nft_script`] write what kube-proxy's two netfilter
//! proxiers write on a *full* sync for TCP ClusterIP and NodePort Services whose
//! endpoints are all usable from this node, with `externalTrafficPolicy: Cluster`,
//! `internalTrafficPolicy: Cluster`, no session affinity, no externalIPs and no
//! load balancer. The text follows the proxier source line by line (rule order,
//! argument order, comments, chain names and their hashes), so the kernel ends up
//! with the same rules a real node would have.
//!
//! # Source
//!
//! Read from `kubernetes/kubernetes` at commit
//! `b0f823e6ccd8a10b3893fc75011b9981af39285c` (the same commit for both files):
//! `pkg/proxy/iptables/proxier.go` (`syncProxyRules`, `writeServiceToEndpointRules`,
//! `iptablesJumpChains`, `iptablesKubeletJumpChains`, `portProtoHash`,
//! `servicePortEndpointChainName`, `computeProbability`) and
//! `pkg/proxy/nftables/proxier.go` (`setupNFTables`, `syncProxyRules`,
//! `writeServiceToEndpointRules`, `nftablesBaseChains`, `nftablesJumpChains`,
//! `hashAndTruncate`). The nftables text format is that of `sigs.k8s.io/knftables`
//! (`objects.go`: `add chain ... { type filter hook prerouting priority -110 ; }`,
//! named priorities turned into numbers, `add element ... { key comment "c" : value }`).
//! That commit was not mapped to a release tag when this was written. By content
//! it is a master commit from between v1.31 and v1.36: it has the nftables
//! partial sync (kubernetes#126013, July 2024), the `filter-output-post-dnat` /
//! `cluster-ips-check` chains, the add-then-delete of base chains on the first
//! sync and the `nftElementStorage` map bookkeeping, and it still lists chains with
//! `nft list chains` rather than the `ListAll` that v1.36 uses.
//!
//! # kube-proxy settings assumed
//!
//! Defaults: `masqueradeBit` 14 (`fmt.Sprintf("%#08x", 1<<14)` = `0x00004000`),
//! `masqueradeAll` false, `detectLocalMode: ClusterCIDR` with
//! [`NodeCfg::cluster_cidr`], `nodePortAddresses` unset (all local addresses
//! accept NodePorts), iptables `localhostNodePorts` true,
//! `nf_conntrack_tcp_be_liberal` 0, and an iptables that supports
//! `--random-fully`. iptables' "large cluster mode" (more than 1000 endpoints:
//! per-endpoint comments dropped) is reproduced.
//!
//! # Differences from the real thing, and why
//!
//! * Service order is the order of the input slice. kube-proxy walks a Go map, so
//!   its order is random and changes between syncs. Endpoints are sorted by their
//!   `ip:port` string and deduplicated, as kube-proxy's endpoint-slice cache does.
//! * iptables: kube-proxy installs the jump rules (`PREROUTING`/`OUTPUT` ->
//!   `KUBE-SERVICES`, `POSTROUTING` -> `KUBE-POSTROUTING`, the filter-table jumps
//!   and kubelet's `KUBE-FIREWALL` jumps) with separate `iptables -C`/`-I` calls
//!   before its `iptables-restore --noflush --counters`. Here they are `-I` lines
//!   in the same payload, in the same call order, so they end up in the same
//!   positions and one `iptables-restore --noflush` sets up everything. Loading the
//!   payload a second time into the same namespace adds a second copy of these
//!   jumps (kube-proxy checks with `-C` first). The rest of the payload is
//!   idempotent.
//! * iptables: the `nfacct` accounting rules (localhost NodePorts and the
//!   `--ctstate INVALID` counter) are left out. They need an nfacct object created
//!   over netlink. kube-proxy leaves them out too when nfacct is unavailable. The
//!   `KUBE-PROXY-CANARY` chains that kube-proxy's iptables monitor creates are
//!   left out because they are empty and never jumped to.
//! * nftables: the script starts with `add table` + `delete table` so it can be
//!   loaded again and again. kube-proxy never deletes its table; it flushes what
//!   it owns and deletes stale chains a second later. After that prologue the
//!   script is kube-proxy's first-sync transaction. On a fresh node that
//!   transaction already starts with the table's first `add`.
//! * Cleanup of stale chains is left out, because a first sync has none (kube-proxy
//!   diffs `iptables-save`/`nft list chains` against the active set).
//! * [`NodeCfg::node_ip`] does not appear in these rules. kube-proxy uses it only
//!   for `loadBalancerSourceRanges`.
//!
//! Rule text is written exactly as kube-proxy writes it, not as `iptables-save`
//! prints it back. For example it writes `-d 10.96.0.10` where `iptables-save`
//! shows `-d 10.96.0.10/32`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Where the rule layout comes from (see the module documentation).
pub const SOURCE: &str = "kubernetes/kubernetes@b0f823e6ccd8a10b3893fc75011b9981af39285c \
    (master between v1.31 and v1.36) pkg/proxy/iptables/proxier.go, \
    pkg/proxy/nftables/proxier.go; nft text format of sigs.k8s.io/knftables";

/// How many of the [`synthetic`] Services get a NodePort (the default NodePort
/// range 30000-32767 holds 2768).
pub const SYNTHETIC_NODEPORTS: usize = 2000;

/// `fmt.Sprintf("%#08x", 1<<masqueradeBit)` with the default bit 14. Go's zero
/// padding does not count the `0x`, hence eight digits.
const MASQ_MARK: &str = "0x00004000";

/// iptables proxier: above this many endpoints it stops writing per-endpoint
/// comments (`largeClusterEndpointsThreshold`).
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// One Service port (kube-proxy's unit: a `ServicePortName`), protocol TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    /// `spec.ports[].name`; may be empty.
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints as (pod IP, target port).
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl Svc {
    /// `ns/name:port`, kube-proxy's `ServicePortName.String()` (`ns/name` when
    /// the port has no name).
    pub fn port_name_string(&self) -> String {
        let (ns, name, port) = (&self.namespace, &self.name, &self.port_name);
        if port.is_empty() {
            format!("{ns}/{name}")
        } else {
            format!("{ns}/{name}:{port}")
        }
    }

    /// Endpoints in the order kube-proxy uses them: deduplicated and sorted by
    /// their `ip:port` string (`sort.Sort(byEndpoint(...))`).
    fn sorted_endpoints(&self) -> Vec<(Ipv4Addr, u16)> {
        let mut eps: Vec<(String, (Ipv4Addr, u16))> = self
            .endpoints
            .iter()
            .map(|&(ip, port)| (format!("{ip}:{port}"), (ip, port)))
            .collect();
        eps.sort_by(|a, b| a.0.cmp(&b.0));
        eps.dedup_by(|a, b| a.0 == b.0);
        eps.into_iter().map(|(_, ep)| ep).collect()
    }
}

/// The node-level kube-proxy settings that show up in the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCfg {
    /// Not used in the rules (kube-proxy uses it only for
    /// `loadBalancerSourceRanges`); kept for the caller's topology.
    pub node_ip: Ipv4Addr,
    /// `clusterCIDR`, e.g. `10.244.0.0/16`. Empty means no local-traffic
    /// detector, so there is no "masquerade off-cluster traffic to ClusterIPs"
    /// rule.
    pub cluster_cidr: String,
    /// The Service CIDR as kube-proxy learns it from `ServiceCIDR` objects
    /// (`10.96.0.0/12` on a default cluster). When set, the nftables proxier adds
    /// its "drop traffic to unallocated ClusterIPs" rule. The iptables proxier
    /// ignores it.
    pub service_cidr: Option<String>,
}

/// Writes one line into a `String` (which cannot fail).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

// ---------------------------------------------------------------------------
// iptables
// ---------------------------------------------------------------------------

/// `iptablesJumpChains` then `iptablesKubeletJumpChains`, filter table:
/// (source chain, extra args, comment, destination chain). Each is an
/// `EnsureRule(Prepend, ...)`, i.e. `iptables -I`.
const FILTER_JUMPS: [(&str, &str, &str, &str); 11] = [
    (
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "INPUT",
        "",
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
    (
        "INPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "OUTPUT",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "FORWARD",
        "-m conntrack --ctstate NEW ",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    // kubelet's chain, duplicated by kube-proxy; no comment.
    ("INPUT", "", "", "KUBE-FIREWALL"),
    ("OUTPUT", "", "", "KUBE-FIREWALL"),
];

/// `iptablesJumpChains`, nat table.
const NAT_JUMPS: [(&str, &str, &str, &str); 3] = [
    ("OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES"),
    (
        "PREROUTING",
        "",
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "POSTROUTING",
        "",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
];

fn write_jumps(out: &mut String, jumps: &[(&str, &str, &str, &str)]) {
    for &(src, extra, comment, dst) in jumps {
        if comment.is_empty() {
            emit!(out, "-I {src} {extra}-j {dst}");
        } else {
            emit!(
                out,
                "-I {src} {extra}-m comment --comment \"{comment}\" -j {dst}"
            );
        }
    }
}

/// `portProtoHash`: the first 16 characters of base32(sha256(name + protocol)).
fn port_proto_hash(port_name_string: &str) -> String {
    let mut h = b32_sha256(&format!("{port_name_string}tcp"));
    h.truncate(16);
    h
}

/// `servicePortEndpointChainName`.
fn sep_chain_name(port_name_string: &str, ip: Ipv4Addr, port: u16) -> String {
    let h = b32_sha256(&format!("{port_name_string}tcp{ip}:{port}"));
    format!("KUBE-SEP-{}", &h[..16])
}

/// `computeProbability`: Go's `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
fn probability(n: usize) -> String {
    // n is an endpoint count; exact as f64 far beyond any real value.
    let n = n as f64;
    format!("{:.10}", 1.0 / n)
}

/// The `iptables-restore --noflush` payload (filter and nat tables) of a full
/// kube-proxy sync, plus the jump rules kube-proxy installs beforehand with
/// `iptables -I` (see the module documentation).
pub fn iptables_restore(svcs: &[Svc], node: &NodeCfg) -> String {
    let endpoints: Vec<Vec<(Ipv4Addr, u16)>> = svcs.iter().map(Svc::sorted_endpoints).collect();
    let total_endpoints: usize = endpoints.iter().map(Vec::len).sum();
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    let cidr = &node.cluster_cidr;

    let mut filter_rules = String::new();
    let mut nat_chains = String::new();
    let mut nat_rules = String::new();

    // localhostNodePorts (IPv4): the anti-martian rule kubelet also writes.
    emit!(
        filter_rules,
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    );

    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        emit!(nat_chains, ":{chain} - [0:0]");
    }
    emit!(
        nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    emit!(
        nat_rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
    );
    emit!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
    );
    emit!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");

    for (svc, eps) in svcs.iter().zip(&endpoints) {
        let name = svc.port_name_string();
        let hash = port_proto_hash(&name);
        let svc_chain = format!("KUBE-SVC-{hash}");
        let ext_chain = format!("KUBE-EXT-{hash}");
        let (ip, port) = (svc.cluster_ip, svc.port);

        if eps.is_empty() {
            // No endpoints: REJECT in the filter table, nothing in nat.
            emit!(
                filter_rules,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" \
                 -m tcp -p tcp -d {ip} --dport {port} -j REJECT"
            );
            if let Some(np) = svc.node_port {
                emit!(
                    filter_rules,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" \
                     -m addrtype --dst-type LOCAL -m tcp -p tcp --dport {np} -j REJECT"
                );
            }
            continue;
        }

        // Capture the clusterIP.
        emit!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" \
             -m tcp -p tcp -d {ip} --dport {port} -j {svc_chain}"
        );
        // Capture the nodePort.
        if let Some(np) = svc.node_port {
            emit!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {np} -j {ext_chain}"
            );
        }
        // Masquerade off-cluster traffic to the ClusterIP.
        if !cidr.is_empty() {
            emit!(
                nat_rules,
                "-A {svc_chain} -m comment --comment \"{name} cluster IP\" \
                 -m tcp -p tcp -d {ip} --dport {port} ! -s {cidr} -j KUBE-MARK-MASQ"
            );
        }
        // External (NodePort) traffic, policy Cluster: masquerade, then the SVC chain.
        if svc.node_port.is_some() {
            emit!(nat_chains, ":{ext_chain} - [0:0]");
            emit!(
                nat_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" \
                 -j KUBE-MARK-MASQ"
            );
            emit!(nat_rules, "-A {ext_chain} -j {svc_chain}");
        }

        // Load balancing: 1/(n-i) for all but the last endpoint.
        emit!(nat_chains, ":{svc_chain} - [0:0]");
        let seps: Vec<String> = eps
            .iter()
            .map(|&(ep_ip, ep_port)| sep_chain_name(&name, ep_ip, ep_port))
            .collect();
        let n = eps.len();
        for (i, (&(ep_ip, ep_port), sep)) in eps.iter().zip(&seps).enumerate() {
            let mut rule = format!("-A {svc_chain}");
            if !large_cluster {
                let _ = write!(
                    rule,
                    " -m comment --comment \"{name} -> {ep_ip}:{ep_port}\""
                );
            }
            if i < n - 1 {
                let p = probability(n - i);
                let _ = write!(rule, " -m statistic --mode random --probability {p}");
            }
            emit!(nat_rules, "{rule} -j {sep}");
        }

        // Per-endpoint chains: hairpin masquerade, then DNAT.
        let comment = if large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        for (&(ep_ip, ep_port), sep) in eps.iter().zip(&seps) {
            emit!(nat_chains, ":{sep} - [0:0]");
            emit!(nat_rules, "-A {sep}{comment} -s {ep_ip} -j KUBE-MARK-MASQ");
            emit!(
                nat_rules,
                "-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination {ep_ip}:{ep_port}"
            );
        }
    }

    // Tail call to the NodePorts chain (nodePortAddresses unset, localhostNodePorts).
    emit!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );

    emit!(
        filter_rules,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    emit!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    emit!(
        filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    let mut out =
        String::with_capacity(filter_rules.len() + nat_chains.len() + nat_rules.len() + 4096);
    out.push_str("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        emit!(out, ":{chain} - [0:0]");
    }
    write_jumps(&mut out, &FILTER_JUMPS);
    out.push_str(&filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&nat_chains);
    write_jumps(&mut out, &NAT_JUMPS);
    out.push_str(&nat_rules);
    out.push_str("COMMIT\n");
    out
}

// ---------------------------------------------------------------------------
// nftables
// ---------------------------------------------------------------------------

/// Family and table of every object.
const T: &str = "ip kube-proxy";

/// `nftablesBaseChains`: name, type, hook, priority (knftables writes
/// `dstnat-10` etc. as numbers: dstnat = -100, srcnat = 100).
const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// `nftablesJumpChains`: destination, source, extra match.
const JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    (
        "cluster-ips-check",
        "filter-output-post-dnat",
        "ct state new",
    ),
];

/// `hashAndTruncate`: 8 base32 characters of sha256(name), `-`, name; at most
/// 240 characters (`knftables.NameLengthMax` minus the longest prefix).
fn nft_chain_base(name: &str) -> String {
    const MAX: usize = 256 - 16;
    let h = b32_sha256(name);
    let mut base = format!("{}-{name}", &h[..8]);
    if base.len() > MAX {
        base.truncate(MAX - 3);
        base.push_str("...");
    }
    base
}

/// `ensureChain`: add and flush a chain the first time it is mentioned.
fn ensure_chain<'a>(out: &mut String, created: &mut Vec<&'a str>, chain: &'a str) {
    if !created.contains(&chain) {
        created.push(chain);
        emit!(out, "add chain {T} {chain}");
        emit!(out, "flush chain {T} {chain}");
    }
}

/// The `nft -f -` input of kube-proxy's first full sync, preceded by an
/// `add table`/`delete table` pair that makes it reloadable (see the module
/// documentation).
pub fn nft_script(svcs: &[Svc], node: &NodeCfg) -> String {
    let mut s = String::new();
    // Not kube-proxy's: drop whatever an earlier load left behind.
    emit!(s, "add table {T}");
    emit!(s, "delete table {T}");

    // setupNFTables
    emit!(s, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    // First sync only: add+delete so that base chains get recreated.
    for (name, ..) in BASE_CHAINS {
        emit!(s, "add chain {T} {name}");
        emit!(s, "delete chain {T} {name}");
    }
    for (name, kind, hook, prio) in BASE_CHAINS {
        emit!(
            s,
            "add chain {T} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
        emit!(s, "flush chain {T} {name}");
    }
    let mut created: Vec<&str> = Vec::new();
    for (dst, src, extra) in JUMP_CHAINS {
        ensure_chain(&mut s, &mut created, dst);
        if extra.is_empty() {
            emit!(s, "add rule {T} {src} jump {dst}");
        } else {
            emit!(s, "add rule {T} {src} {extra} jump {dst}");
        }
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure_chain(&mut s, &mut created, chain);
    }
    emit!(
        s,
        "add rule {T} mark-for-masquerade mark set mark or {MASQ_MARK}"
    );
    emit!(
        s,
        "add rule {T} masquerading mark and {MASQ_MARK} == 0 return"
    );
    emit!(s, "add rule {T} masquerading mark set mark xor {MASQ_MARK}");
    emit!(s, "add rule {T} masquerading masquerade fully-random");

    emit!(
        s,
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    emit!(
        s,
        "add rule {T} cluster-ips-check ip daddr @cluster-ips reject \
         comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if let Some(cidr) = node.service_cidr.as_deref().filter(|c| !c.is_empty()) {
        emit!(
            s,
            "add rule {T} cluster-ips-check ip daddr {{ {cidr} }} drop \
             comment \"Drop traffic to unallocated ClusterIPs\""
        );
    }
    // nodePortAddresses unset: the nodeport-ips set is not needed (add+delete).
    emit!(
        s,
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    emit!(s, "delete set {T} nodeport-ips");

    emit!(
        s,
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    emit!(
        s,
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    emit!(
        s,
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    emit!(s, "flush chain {T} reject-chain");
    emit!(s, "add rule {T} reject-chain reject");
    emit!(
        s,
        "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    emit!(
        s,
        "add rule {T} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport \
         vmap @no-endpoint-nodeports"
    );

    emit!(
        s,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure_chain(&mut s, &mut created, "firewall-check");
    emit!(
        s,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );

    emit!(
        s,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    emit!(
        s,
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}"
    );
    emit!(
        s,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    emit!(
        s,
        "add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport \
         vmap @service-nodeports"
    );

    emit!(s, "flush set {T} cluster-ips");
    for map in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        emit!(s, "flush map {T} {map}");
    }

    // syncProxyRules, per Service port.
    let cidr = &node.cluster_cidr;
    for svc in svcs {
        let eps = svc.sorted_endpoints();
        let name = svc.port_name_string();
        let (ns, svc_name, port_name) = (&svc.namespace, &svc.name, &svc.port_name);
        let base = nft_chain_base(&format!("{ns}/{svc_name}/tcp/{port_name}"));
        let cluster_chain = format!("service-{base}");
        let ext_chain = format!("external-{base}");
        let ep_chains: Vec<String> = eps
            .iter()
            .map(|(ip, port)| {
                let ep = nft_chain_base(&format!("{ns}/{svc_name}/tcp/{port_name}__{ip}/{port}"));
                format!("endpoint-{ep}")
            })
            .collect();
        let (ip, port) = (svc.cluster_ip, svc.port);

        if eps.is_empty() {
            emit!(s, "add element {T} cluster-ips {{ {ip} }}");
            emit!(
                s,
                "add element {T} no-endpoint-services {{ {ip} . tcp . {port} comment \"{name}\" : goto reject-chain }}"
            );
            if let Some(np) = svc.node_port {
                emit!(
                    s,
                    "add element {T} no-endpoint-nodeports {{ tcp . {np} comment \"{name}\" : goto reject-chain }}"
                );
            }
            continue;
        }

        for chain in &ep_chains {
            emit!(s, "add chain {T} {chain}");
            emit!(s, "flush chain {T} {chain}");
        }
        emit!(s, "add chain {T} {cluster_chain}");
        emit!(s, "flush chain {T} {cluster_chain}");
        if svc.node_port.is_some() {
            emit!(s, "add chain {T} {ext_chain}");
            emit!(s, "flush chain {T} {ext_chain}");
        }

        emit!(s, "add element {T} cluster-ips {{ {ip} }}");
        emit!(
            s,
            "add element {T} service-ips {{ {ip} . tcp . {port} : goto {cluster_chain} }}"
        );
        if let Some(np) = svc.node_port {
            emit!(
                s,
                "add element {T} service-nodeports {{ tcp . {np} : goto {ext_chain} }}"
            );
        }

        if !cidr.is_empty() {
            emit!(
                s,
                "add rule {T} {cluster_chain} ip daddr {ip} tcp dport {port} ip saddr != {cidr} \
                 jump mark-for-masquerade"
            );
        }
        if svc.node_port.is_some() {
            emit!(s, "add rule {T} {ext_chain} jump mark-for-masquerade");
            emit!(s, "add rule {T} {ext_chain} goto {cluster_chain}");
        }

        let vmap: Vec<String> = ep_chains
            .iter()
            .enumerate()
            .map(|(i, chain)| format!("{i} : goto {chain}"))
            .collect();
        emit!(
            s,
            "add rule {T} {cluster_chain} numgen random mod {} vmap {{ {} }}",
            ep_chains.len(),
            vmap.join(" , ")
        );

        for (&(ep_ip, ep_port), chain) in eps.iter().zip(&ep_chains) {
            emit!(
                s,
                "add rule {T} {chain} ip saddr {ep_ip} jump mark-for-masquerade"
            );
            emit!(
                s,
                "add rule {T} {chain} meta l4proto tcp dnat to {ep_ip}:{ep_port}"
            );
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Synthetic input
// ---------------------------------------------------------------------------

/// `n` Services `bench/svc-<i>` port `http` at `10.96.x.y:80` (consecutive
/// addresses from 10.96.0.10, inside the default 10.96.0.0/12), the first
/// [`SYNTHETIC_NODEPORTS`] with NodePort `30000 + i`, each with
/// `endpoints_per_svc` endpoints `10.244.x.y:8080` (consecutive from
/// 10.244.0.10, wrapping inside 10.244.0.0/16 after 65,000 endpoints).
///
/// # Panics
///
/// If `n` is more than 1,000,000 (the addresses would leave 10.96.0.0/12).
pub fn synthetic(n: usize, endpoints_per_svc: usize) -> Vec<Svc> {
    const EP_SPAN: usize = 65_000;
    assert!(
        n <= 1_000_000,
        "synthetic: at most 1,000,000 services fit 10.96.0.0/12"
    );
    let svc_base = u32::from(Ipv4Addr::new(10, 96, 0, 10));
    let ep_base = u32::from(Ipv4Addr::new(10, 244, 0, 10));
    let offset = |x: usize| u32::try_from(x).expect("bounded above");
    (0..n)
        .map(|i| {
            let node_port = if i < SYNTHETIC_NODEPORTS {
                u16::try_from(30_000 + i).ok()
            } else {
                None
            };
            let endpoints = (0..endpoints_per_svc)
                .map(|j| {
                    let k = (i * endpoints_per_svc + j) % EP_SPAN;
                    (Ipv4Addr::from(ep_base + offset(k)), 8080)
                })
                .collect();
            Svc {
                namespace: "bench".to_string(),
                name: format!("svc-{i}"),
                port_name: "http".to_string(),
                cluster_ip: Ipv4Addr::from(svc_base + offset(i)),
                port: 80,
                node_port,
                endpoints,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// SHA-256 and base32 (Go's crypto/sha256 + encoding/base32 StdEncoding)
// ---------------------------------------------------------------------------

/// base32(sha256(s)) with the standard alphabet, as kube-proxy's chain names use.
fn b32_sha256(s: &str) -> String {
    base32(&sha256(s.as_bytes()))
}

/// RFC 4648 base32, standard alphabet, with `=` padding.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &byte in data {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
        // Keep only the bits not yet written.
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    while !out.len().is_multiple_of(8) {
        out.push('=');
    }
    out
}

/// FIPS 180-4 SHA-256.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut msg = Vec::with_capacity(data.len() + 72);
    msg.extend_from_slice(data);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());

    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }

        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for (&k, &wi) in K.iter().zip(w.iter()) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(k)
                .wrapping_add(wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(v);
        }
    }

    let mut out = [0u8; 32];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeCfg {
        NodeCfg {
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            cluster_cidr: "10.244.0.0/16".to_string(),
            service_cidr: Some("10.96.0.0/12".to_string()),
        }
    }

    fn svc(name: &str, ip: [u8; 4], node_port: Option<u16>, eps: &[[u8; 4]]) -> Svc {
        Svc {
            namespace: "ns1".to_string(),
            name: name.to_string(),
            port_name: "p80".to_string(),
            cluster_ip: Ipv4Addr::from(ip),
            port: 80,
            node_port,
            endpoints: eps.iter().map(|&e| (Ipv4Addr::from(e), 8080)).collect(),
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The lines of one `*table` section of an iptables-restore payload.
    fn table<'a>(payload: &'a str, name: &str) -> Vec<&'a str> {
        payload
            .lines()
            .skip_while(|l| *l != format!("*{name}"))
            .skip(1)
            .take_while(|l| *l != "COMMIT")
            .collect()
    }

    #[test]
    fn sha256_and_base32_vectors() {
        // Values from python3 hashlib / base64.b32encode.
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Two blocks (56 bytes of input force a second padding block).
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            b32_sha256("abc"),
            "XJ4BNP4PAHH6UQKBIDPF3LRCEOYAGYNDSYLXVHFUCD7WD4QACWWQ===="
        );
        assert_eq!(base32(b"f"), "MY======");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names from kubernetes' own proxier tests, rechecked with python3.
        assert_eq!(port_proto_hash("ns2/svc2:p80"), "GNZBNJ2PO5MGZ6GT");
        assert_eq!(
            sep_chain_name("ns1/svc1:p80", Ipv4Addr::new(10, 180, 0, 1), 80),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            nft_chain_base("ns1/svc1/tcp/p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_chain_base("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let long = "x".repeat(300);
        let base = nft_chain_base(&long);
        assert_eq!(base.len(), 240);
        assert!(base.ends_with("..."));
    }

    #[test]
    fn port_name_string_formats() {
        let mut s = svc("svc1", [10, 96, 0, 10], None, &[]);
        assert_eq!(s.port_name_string(), "ns1/svc1:p80");
        s.port_name.clear();
        assert_eq!(s.port_name_string(), "ns1/svc1");
    }

    #[test]
    fn probabilities_for_three_endpoints() {
        let s = svc(
            "svc1",
            [10, 96, 0, 10],
            None,
            &[[10, 244, 0, 1], [10, 244, 0, 2], [10, 244, 0, 3]],
        );
        let out = iptables_restore(&[s], &node());
        let lb: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
            .collect();
        assert_eq!(lb.len(), 3);
        assert!(
            lb[0].contains("--probability 0.3333333333 -j KUBE-SEP-"),
            "{}",
            lb[0]
        );
        assert!(
            lb[1].contains("--probability 0.5000000000 -j KUBE-SEP-"),
            "{}",
            lb[1]
        );
        assert!(!lb[2].contains("statistic"), "{}", lb[2]);
        assert!(lb[0].contains("--comment \"ns1/svc1:p80 -> 10.244.0.1:8080\""));
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(probability(1000), "0.0010000000");
    }

    #[test]
    fn endpoints_are_sorted_as_strings_and_deduplicated() {
        let s = svc(
            "svc1",
            [10, 96, 0, 10],
            None,
            &[[10, 244, 0, 9], [10, 244, 0, 10], [10, 244, 0, 9]],
        );
        assert_eq!(
            s.sorted_endpoints(),
            vec![
                (Ipv4Addr::new(10, 244, 0, 10), 8080),
                (Ipv4Addr::new(10, 244, 0, 9), 8080)
            ]
        );
    }

    #[test]
    fn iptables_rule_counts() {
        let svcs = [
            svc(
                "svc1",
                [10, 96, 0, 10],
                Some(30001),
                &[[10, 244, 0, 1], [10, 244, 0, 2], [10, 244, 0, 3]],
            ),
            svc(
                "svc2",
                [10, 96, 0, 11],
                None,
                &[[10, 244, 1, 1], [10, 244, 1, 2]],
            ),
            svc("svc3", [10, 96, 0, 12], Some(30003), &[]),
        ];
        let out = iptables_restore(&svcs, &node());
        let filter = table(&out, "filter");
        let nat = table(&out, "nat");
        let count =
            |lines: &[&str], prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();

        // 6 chains; 11 jumps; KUBE-FIREWALL + 2 REJECTs for svc3 + 3 KUBE-FORWARD.
        assert_eq!(count(&filter, ":"), 6);
        assert_eq!(count(&filter, "-I "), 11);
        assert_eq!(count(&filter, "-A "), 6);
        assert_eq!(count(&filter, "-A KUBE-SERVICES "), 1);
        assert_eq!(count(&filter, "-A KUBE-EXTERNAL-SERVICES "), 1);

        // 4 top-level + svc1 (EXT, SVC, 3 SEP) + svc2 (SVC, 2 SEP).
        assert_eq!(count(&nat, ":"), 4 + 5 + 3);
        assert_eq!(count(&nat, ":KUBE-SEP-"), 5);
        assert_eq!(count(&nat, "-I "), 3);
        // POSTROUTING 3 + MARK-MASQ 1
        // + svc1: SERVICES 1, NODEPORTS 1, SVC masq 1, EXT 2, SVC lb 3, SEP 6
        // + svc2: SERVICES 1, SVC masq 1, SVC lb 2, SEP 4
        // + the final KUBE-SERVICES -> KUBE-NODEPORTS rule.
        assert_eq!(count(&nat, "-A "), 4 + 14 + 8 + 1);
        assert_eq!(count(&nat, "-A KUBE-NODEPORTS "), 1);
        assert!(
            nat.last()
                .is_some_and(|l| l.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"))
        );
        assert!(nat.iter().any(|l| l.starts_with("-A KUBE-SVC-")
            && l.contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ")
            && l.contains("-d 10.96.0.10 --dport 80")));
        assert!(nat.iter().any(|l| l.starts_with("-A KUBE-SEP-")
            && l.ends_with("-m tcp -p tcp -j DNAT --to-destination 10.244.0.1:8080")));
        assert!(nat.iter().any(
            |l| l.starts_with("-A KUBE-SEP-") && l.ends_with("-s 10.244.0.1 -j KUBE-MARK-MASQ")
        ));
        assert!(nat.contains(
            &"-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
              -j MASQUERADE --random-fully"
        ));
        assert!(out.starts_with("*filter\n"));
        assert!(out.ends_with("COMMIT\n"));
    }

    #[test]
    fn iptables_large_cluster_mode_drops_endpoint_comments() {
        let svcs = synthetic(400, 3);
        let out = iptables_restore(&svcs, &node());
        assert!(!out.contains(" -> "));
        assert!(
            out.lines()
                .filter(|l| l.starts_with("-A KUBE-SEP-"))
                .all(|l| !l.contains("comment"))
        );
        // KUBE-SERVICES rules keep theirs.
        assert!(out.contains("--comment \"bench/svc-0:http cluster IP\""));
        let small = iptables_restore(&synthetic(10, 3), &node());
        assert!(small.contains("--comment \"bench/svc-0:http -> "));
    }

    #[test]
    fn nft_script_contents() {
        let svcs = [
            svc(
                "svc1",
                [10, 96, 0, 10],
                Some(30001),
                &[[10, 244, 0, 1], [10, 244, 0, 2], [10, 244, 0, 3]],
            ),
            svc("svc3", [10, 96, 0, 12], Some(30003), &[]),
        ];
        let out = nft_script(&svcs, &node());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "add table ip kube-proxy");
        assert_eq!(lines[1], "delete table ip kube-proxy");
        assert_eq!(
            lines[2],
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }"
        );
        for line in [
            "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; \
             comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
            "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; \
             comment \"NodePort traffic\" ; }",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 \
             meta l4proto . th dport vmap @service-nodeports",
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
            "add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/12 } drop \
             comment \"Drop traffic to unallocated ClusterIPs\"",
            "add element ip kube-proxy no-endpoint-services { 10.96.0.12 . tcp . 80 \
             comment \"ns1/svc3:p80\" : goto reject-chain }",
            "add element ip kube-proxy no-endpoint-nodeports { tcp . 30003 \
             comment \"ns1/svc3:p80\" : goto reject-chain }",
        ] {
            assert!(lines.contains(&line), "missing: {line}");
        }

        let base = nft_chain_base("ns1/svc1/tcp/p80");
        let svc_chain = format!("service-{base}");
        let ep = |i: u8| {
            format!(
                "endpoint-{}",
                nft_chain_base(&format!("ns1/svc1/tcp/p80__10.244.0.{i}/8080"))
            )
        };
        let expect = [
            format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {svc_chain} }}"
            ),
            format!(
                "add element ip kube-proxy service-nodeports {{ tcp . 30001 : goto external-{base} }}"
            ),
            format!(
                "add rule ip kube-proxy {svc_chain} numgen random mod 3 vmap {{ 0 : goto {} , 1 : goto {} , 2 : goto {} }}",
                ep(1),
                ep(2),
                ep(3)
            ),
            format!(
                "add rule ip kube-proxy {svc_chain} ip daddr 10.96.0.10 tcp dport 80 \
                 ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
            ),
            format!("add rule ip kube-proxy external-{base} jump mark-for-masquerade"),
            format!("add rule ip kube-proxy external-{base} goto {svc_chain}"),
            format!(
                "add rule ip kube-proxy {} ip saddr 10.244.0.2 jump mark-for-masquerade",
                ep(2)
            ),
            format!(
                "add rule ip kube-proxy {} meta l4proto tcp dnat to 10.244.0.2:8080",
                ep(2)
            ),
        ];
        for line in &expect {
            assert!(lines.contains(&line.as_str()), "missing: {line}");
        }
        // Each chain is created before anything refers to it.
        let first = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or(usize::MAX)
        };
        assert!(first(&format!("add chain ip kube-proxy {}", ep(3))) < first("numgen"));

        // No Service CIDR known: no drop rule.
        let mut n = node();
        n.service_cidr = None;
        assert!(!nft_script(&svcs, &n).contains("unallocated"));
    }

    #[test]
    fn synthetic_shape() {
        let svcs = synthetic(2500, 2);
        assert_eq!(svcs.len(), 2500);
        assert_eq!(svcs[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(svcs[0].node_port, Some(30000));
        assert_eq!(svcs[SYNTHETIC_NODEPORTS - 1].node_port, Some(31999));
        assert_eq!(svcs[SYNTHETIC_NODEPORTS].node_port, None);
        assert_eq!(svcs[300].cluster_ip, Ipv4Addr::new(10, 96, 1, 54));
        assert_eq!(
            svcs[1].endpoints,
            vec![
                (Ipv4Addr::new(10, 244, 0, 12), 8080),
                (Ipv4Addr::new(10, 244, 0, 13), 8080)
            ]
        );
        let mut ips: Vec<Ipv4Addr> = svcs.iter().map(|s| s.cluster_ip).collect();
        ips.sort_unstable();
        ips.dedup();
        assert_eq!(ips.len(), 2500);
        // Endpoints stay inside 10.244.0.0/16 even for big inputs.
        let big = synthetic(30_000, 3);
        assert!(big.iter().flat_map(|s| &s.endpoints).all(|(ip, _)| {
            let o = ip.octets();
            o[0] == 10 && o[1] == 244
        }));
    }
}
