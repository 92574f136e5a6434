//! Proves the chain end to end: the object embedded in lbctl loads, the
//! agent's translation programs its maps, and a program run with
//! BPF_PROG_TEST_RUN rewrites a crafted packet as expected.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use lb_tests::{
    fixture,
    guard::sweep,
    packet::{Frame, SYN, assert_frame},
    require_root,
};
use lbctl::agent::model::NodeInfo;

const TC_ACT_OK: u32 = 0;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
"#;

#[test]
fn nodeport_syn_to_a_local_backend_is_rewritten() {
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
        snat: None,
        balancing: Default::default(),
    };
    let _rec = fixture::program(&pins, MANIFESTS, &node);

    let prog: &mut SchedClassifier = ebpf
        .program_mut("lb_from_netdev")
        .expect("program")
        .try_into()
        .expect("tc program");
    lbctl::datapath::load::verified(|| prog.load()).expect("verifier accepts lb_from_netdev");

    let client = (Ipv4Addr::new(192, 168, 50, 7), 40000);
    let input = Frame::tcp(client, (Ipv4Addr::new(172, 18, 0, 2), 30080), SYN);
    let want = input
        .with(client, (Ipv4Addr::new(10, 244, 1, 5), 8080))
        .bytes();
    let data = input.bytes();
    let mut out = vec![0u8; data.len() + 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("PROG_TEST_RUN");
    assert_eq!(r.return_value, TC_ACT_OK, "verdict");
    assert_frame(
        "NodePort SYN, local backend",
        &out[..r.data_size_out as usize],
        &want,
    );
}
