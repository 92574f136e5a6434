//! Command line: one module per subcommand (its arguments and `execute`).

pub mod agent;
pub mod backends;
pub mod conntrack;
pub mod counters;
pub mod diff;
pub mod docs;
pub mod explain;
pub mod render;
pub mod services;
pub mod status;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::datapath::pins::DEFAULT_BPFFS;

#[derive(Debug, Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Kubernetes Service load balancer on eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the agent's maps are pinned; shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct PinArgs {
    /// bpffs folder of the agent's pinned maps and links.
    #[arg(long, env = "LBCTL_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep the datapath in sync with the Services.
    Agent(Box<agent::Args>),
    /// List Services as the datapath has them.
    #[command(alias = "svc")]
    Services(services::Args),
    /// One Service's backends: state, conditions, node, counters.
    #[command(alias = "be")]
    Backends(backends::Args),
    /// The device path's connection-tracking entries.
    #[command(alias = "ct")]
    Conntrack(conntrack::Args),
    /// The datapath's counters per verdict.
    Counters(counters::Args),
    /// Compare the agent's source (folder or API) with the pinned maps:
    /// entries missing, stale or extra. Exits 1 when they differ.
    Diff(diff::Args),
    /// Where a packet (--src) or a pod's socket (--cookie) to a Service
    /// address would go, and why: frontend, backend, hash, existing flow.
    Explain(explain::Args),
    /// What is attached where, and how full each map is.
    Status(status::Args),
    /// Print shell completions.
    Completions(docs::CompletionArgs),
    /// Print the man page (roff) of lbctl and its subcommands.
    Man,
}

/// The whole program: logging to stderr, then the subcommand.
pub fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(a) => {
            crate::agent::heap::cap_arenas();
            tokio::runtime::Runtime::new()?.block_on(agent::execute(*a))
        }
        Command::Services(a) => services::execute(a),
        Command::Backends(a) => backends::execute(a),
        Command::Conntrack(a) => conntrack::execute(a),
        Command::Counters(a) => counters::execute(a),
        Command::Explain(a) => explain::execute(a),
        Command::Status(a) => status::execute(a),
        Command::Diff(a) => tokio::runtime::Runtime::new()?.block_on(diff::execute(a)),
        Command::Completions(a) => docs::completions(a),
        Command::Man => docs::man(),
    }
}

#[cfg(test)]
mod golden {
    //! The human tables, byte for byte: a change to a column shows here.

    use std::net::Ipv4Addr;

    use super::{backends, counters, explain, services};

    #[test]
    fn services_table() {
        let v = vec![services::ServiceView {
            id: 1,
            namespace: "demo".into(),
            name: "web".into(),
            port_name: "http".into(),
            svc_type: "NodePort".into(),
            protocol: "TCP".into(),
            frontends: vec![
                services::FrontendView {
                    kind: "ClusterIP".into(),
                    address: Ipv4Addr::new(10, 96, 0, 10),
                    port: 80,
                },
                services::FrontendView {
                    kind: "NodePort".into(),
                    address: Ipv4Addr::new(172, 18, 0, 2),
                    port: 30080,
                },
            ],
            backends: vec![backend()],
            session_affinity_timeout_s: Some(10800),
            algorithm: "maglev".into(),
            maglev_table_size: Some(16381),
            mode: "dsr".into(),
            external_traffic_policy: "Cluster".into(),
            internal_traffic_policy: "Cluster".into(),
            source_ranges: vec![],
            not_enforced: vec!["sessionAffinity: ClientIP".into()],
            flows: 18,
            packets: 108,
            bytes: 9045,
        }];
        let want = concat!(
            " SERVICE        TYPE      PROTO  ALGORITHM     FRONTENDS                    BACKENDS  AFFINITY         POLICY EXT/INT   NOT ENFORCED               FLOWS  PACKETS  BYTES\n",
            " demo/web:http  NodePort  TCP    maglev/16381  10.96.0.10:80 (ClusterIP)    1/1       ClientIP 10800s  Cluster/Cluster  sessionAffinity: ClientIP  18     108      9045\n",
            "                                 dsr           172.18.0.2:30080 (NodePort)\n",
        );
        assert_eq!(services::table(&v), want, "\n{}", services::table(&v));
    }

    fn backend() -> services::BackendView {
        services::BackendView {
            id: 7,
            address: Ipv4Addr::new(10, 244, 1, 11),
            port: 8080,
            state: "active".into(),
            ready: true,
            serving: true,
            terminating: false,
            local: true,
            new_flows: "Cluster".into(),
            node: "node-a".into(),
            zone: "".into(),
            maglev_slots: Some(16381),
        }
    }

    #[test]
    fn backends_table() {
        let mut remote = backend();
        remote.id = 8;
        remote.address = Ipv4Addr::new(10, 244, 2, 11);
        remote.local = false;
        remote.node = "node-b".into();
        remote.zone = "zone-b".into();
        remote.state = "terminating".into();
        remote.ready = false;
        remote.terminating = true;
        remote.new_flows = "no: terminating, existing flows only".into();
        remote.maglev_slots = Some(0);
        let v = vec![backends::ServiceBackendsView {
            service: "demo/web".into(),
            port_name: "http".into(),
            port: 80,
            protocol: "TCP".into(),
            backends: vec![
                backends::BackendStatsView {
                    backend: backend(),
                    flows: 12,
                    packets: 70,
                    bytes: 5120,
                    conntrack_flows: 2,
                },
                backends::BackendStatsView {
                    backend: remote,
                    flows: 3,
                    packets: 0,
                    bytes: 0,
                    conntrack_flows: 0,
                },
            ],
        }];
        let t = backends::table(&v);
        let want = concat!(
            "demo/web port http 80/TCP\n",
            " ID  BACKEND           STATE        CONDITIONS           NEW FLOWS                             NODE            ZONE    FLOWS  CT FLOWS  PACKETS  BYTES\n",
            " 7   10.244.1.11:8080  active       ready,serving        Cluster (16381 slots)                 node-a (local)  -       12     2         70       5120\n",
            " 8   10.244.2.11:8080  terminating  serving,terminating  no: terminating, existing flows only  node-b          zone-b  3      0         0        0\n",
        );
        assert_eq!(t, want, "\n{t}");
        let json = serde_json::to_value(&v).unwrap();
        let b = &json[0]["backends"][0];
        for field in [
            "id",
            "address",
            "port",
            "state",
            "ready",
            "serving",
            "terminating",
            "local",
            "new_flows",
            "node",
            "zone",
            "flows",
            "packets",
            "bytes",
            "conntrack_flows",
        ] {
            assert!(b.get(field).is_some(), "JSON field {field} missing: {b}");
        }
    }

    #[test]
    fn explain_table() {
        let v = explain::ExplainView {
            path: "device".into(),
            program: "lb_from_netdev".into(),
            protocol: "TCP".into(),
            src: Some("172.18.0.10:40000".into()),
            dst: "172.18.0.2:30080".into(),
            cookie: None,
            device: Some("eth0".into()),
            frontend: Some(explain::FrontendInfo {
                service: "demo/web".into(),
                port_name: "http".into(),
                service_id: 1,
                kind: "NodePort".into(),
                address: Ipv4Addr::new(172, 18, 0, 2),
                port: 30080,
                active_backends: 3,
                terminating_backends: 0,
                session_affinity: "None".into(),
                external_traffic_policy: "Cluster".into(),
                internal_traffic_policy: "Cluster".into(),
            }),
            decision: "new_flow".into(),
            reason:
                "hash 0x59f7bd2c of (src, dst, ports, protocol) % 3 backends = slot 2 -> backend 4"
                    .into(),
            verdicts: vec!["forward_new".into()],
            return_code: Some("TC_ACT_OK (to the stack)".into()),
            hash: Some(0x59f7bd2c),
            candidates: 3,
            slot: Some(2),
            backend: Some(explain::BackendInfo {
                id: 4,
                address: Ipv4Addr::new(10, 244, 1, 13),
                port: 8080,
                node: "node-a".into(),
                local: true,
                active: true,
            }),
            translated_src: Some("172.18.0.10:40000".into()),
            translated_dst: Some("10.244.1.13:8080".into()),
            snat: false,
            dsr: false,
            conntrack: None,
            notes: vec![],
        };
        let t = explain::table(&v);
        let want = concat!(
            " packet    TCP 172.18.0.10:40000 -> 172.18.0.2:30080 (device path, lb_from_netdev on eth0)\n",
            " frontend  demo/web:http NodePort 172.18.0.2:30080 (3 active, 0 terminating backends; affinity None; policy Cluster/Cluster)\n",
            " decision  new_flow: hash 0x59f7bd2c of (src, dst, ports, protocol) % 3 backends = slot 2 -> backend 4\n",
            " backend   10.244.1.13:8080 (id 4, node-a (local))\n",
            " rewrite   172.18.0.10:40000 -> 10.244.1.13:8080\n",
            " verdict   forward_new -> TC_ACT_OK (to the stack)\n",
        );
        assert_eq!(t, want, "\n{t}");
    }

    #[test]
    fn counters_table() {
        let mut counts = vec![0u64; 64];
        counts[2] = 9;
        let v = counters::view(&counts);
        let t = counters::table(&v[..4]);
        let want = concat!(
            " VERDICT              COUNT\n",
            " pass_not_ipv4        0\n",
            " pass_not_service     0\n",
            " forward_new          9\n",
            " forward_established  0\n",
        );
        assert_eq!(t, want, "\n{t}");
    }
}
