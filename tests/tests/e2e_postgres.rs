//! The classic pattern for a service outside the cluster, with real
//! PostgreSQL: a Service without selector and a hand-written Endpoints
//! object naming the primary. Pointing the Endpoints file at the replica
//! moves new connections there within a second, restarting nothing.

use std::{path::PathBuf, time::Duration};

use lb_tests::{
    guard::sweep,
    postgres::{Postgres, time_switch, which_server},
    require_root,
    topo::{self, Cluster, EXT_IP, Topology},
};

const PRIMARY: &str = "192.168.0.10";
const REPLICA: &str = "192.168.0.11";

fn manifests(endpoint: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: postgres, namespace: db}}
spec:
  clusterIP: 10.96.5.5
  ports: [{{name: pg, port: 5432}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: postgres, namespace: db}}
subsets:
- addresses: [{{ip: {endpoint}}}]
  ports: [{{name: pg, port: 5432}}]
"#
    )
}

#[test]
fn psql_through_a_clusterip_follows_the_endpoints_file() {
    require_root();
    sweep();
    let t = Topology::new(1);
    assert_eq!(EXT_IP.to_string(), PRIMARY);
    t.ext
        .run(&["ip", "addr", "add", &format!("{REPLICA}/24"), "dev", "eth0"]);
    let _primary = Postgres::start(&t.ext, PRIMARY.parse().unwrap(), "primary");
    let _replica = Postgres::start(&t.ext, REPLICA.parse().unwrap(), "replica");
    let c = Cluster::start(
        &PathBuf::from(env!("CARGO_BIN_EXE_lbctl-e2e")),
        t,
        &[("postgres.yaml", &manifests(PRIMARY))],
    );
    c.wait_services("db/postgres", |s| s.len() == 1);

    let pod = &c.topo.pod("pod-1").ns;
    let psql = || {
        let args = which_server("10.96.5.5");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        topo::curl(c.in_cgroup(pod, "psql", &refs))
    };
    assert_eq!(psql().expect("psql to the primary"), "primary");

    c.write("postgres.yaml", &manifests(REPLICA));
    let took = time_switch(psql, "primary", "replica");
    eprintln!(
        "new connections reached the replica {} ms after the Endpoints file changed",
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(1),
        "switch took {took:?}, the agent promises under a second"
    );
    for _ in 0..3 {
        assert_eq!(psql().expect("psql to the replica"), "replica");
    }
}
