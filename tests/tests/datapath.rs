//! Datapath tests as data: each case is a description, an input frame, the
//! expected verdict and the expected output frame (compared whole; a
//! mismatch prints both layer by layer). Expected frames are built by the
//! test's own packet builder with checksums computed from scratch. Map
//! state is set through the agent's translation, not by poking entries.
//!
//! Cases run in order against one loaded object, because flows build state:
//! a SYN creates the connection-tracking entries the next cases rely on.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::conntrack::{CT_ORIGINAL, CT_REPLY};
use lb_common::counters::{
    V_DROP_NO_BACKEND, V_DROP_NO_LOCAL_BACKEND, V_DROP_NO_SNAT_PORT, V_DROP_SOURCE_RANGE,
    V_DROP_UNALLOCATED_SERVICE_IP, V_FORWARD_ESTABLISHED, V_FORWARD_NEW, V_FORWARD_RENEWED,
    V_ICMP_TRANSLATED, V_PASS_FRAGMENT_UNKNOWN, V_PASS_NOT_SERVICE, V_REJECT_NO_BACKEND,
    V_REJECT_UNDEFINED_PORT, V_REPLY, V_RESET_BACKEND_GONE, V_XDP_TO_TC,
};
use lb_tests::{
    fixture,
    guard::sweep,
    packet::{ACK, FIN, Frame, RST, SYN, assert_frame, describe, tcp_ct_key},
    require_root,
};
use lbctl::{
    agent::model::NodeInfo,
    datapath::{load, maps::ServiceMaps},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// bpf_redirect's verdict: the answer to a refused flow leaves by the
/// device it came in on.
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX_VERDICT: u32 = 3;
/// The metadata word of a packet the XDP program dealt with (tc lets it
/// pass): "LBXD", as the program writes it.
const XDP_SEEN: [u8; 4] = 0x4c42_5844u32.to_ne_bytes();

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 7);
const WEB_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const DNS_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const RANGED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 1);

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.9]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: demo, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.6], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  ports: [{port: 80, nodePort: 30099}, {name: udp, port: 53, protocol: UDP, nodePort: 30099}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.77
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30077}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: demo, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.2.5], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.88
  sessionAffinity: ClientIP
  ports: [{port: 80, nodePort: 30088}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: demo, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.21], nodeName: node-a}
- {addresses: [10.244.1.22], nodeName: node-a}
- {addresses: [10.244.1.23], nodeName: node-a}
- {addresses: [10.244.1.24], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: ranged, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.70
  loadBalancerSourceRanges: [192.168.50.0/24]
  ports: [{port: 80, nodePort: 30070}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ranged-1, namespace: demo, labels: {kubernetes.io/service-name: ranged}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.9], nodeName: node-a}]
"#;

enum Want {
    /// Passed on untouched.
    Same,
    Frame(Vec<u8>),
}

struct Case {
    name: &'static str,
    program: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Want,
    /// A verdict counter that must go up by one.
    counts: Option<u32>,
    /// XDP leaves it to tc (besides the answers tc redirects back).
    to_tc: bool,
}

/// What one program run gave: verdict, the frame out (metadata
/// removed) and whether the XDP program marked it as dealt with.
struct Ran {
    verdict: u32,
    frame: Vec<u8>,
    seen: bool,
}

/// Runs `program` (tc or XDP) once on `input` under PROG_TEST_RUN.
fn run_once(ebpf: &mut Ebpf, program: &str, input: &[u8]) -> Ran {
    let mut out = vec![0u8; input.len() + 128];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let prog = ebpf.program_mut(program).expect("program");
    let xdp = matches!(prog, aya::programs::Program::Xdp(_));
    let r = if xdp {
        let p: &mut Xdp = prog.try_into().expect("xdp");
        p.test_run(opts)
    } else {
        let p: &mut SchedClassifier = prog.try_into().expect("tc");
        p.test_run(opts)
    }
    .unwrap_or_else(|e| panic!("{program}: PROG_TEST_RUN: {e:?}"));
    let got = &out[..r.data_size_out as usize];
    // XDP's output starts at the metadata the program added.
    let seen = xdp && got.len() == input.len() + 4 && got[..4] == XDP_SEEN;
    let frame = if seen { &got[4..] } else { got }.to_vec();
    Ran {
        verdict: r.return_value,
        frame,
        seen,
    }
}

fn check(c: &Case, program: &str, ran: &Ran, verdict: u32) {
    assert_eq!(
        ran.verdict,
        verdict,
        "{} ({program}): verdict\n{}",
        c.name,
        describe(&ran.frame)
    );
    match &c.output {
        Want::Same => assert_frame(c.name, &ran.frame, &c.input),
        Want::Frame(f) => assert_frame(c.name, &ran.frame, f),
    }
}

/// Runs case `c` with tc, or, with `xdp`, a device-path case as the
/// kernel runs a packet: XDP first, then tc when XDP leaves it to tc.
fn run(ebpf: &mut Ebpf, maps: &ServiceMaps, c: &Case, xdp: bool) {
    let before = c.counts.map(|v| maps.verdicts()[v as usize]);
    let to_tc_before = maps.verdicts()[V_XDP_TO_TC as usize];
    if xdp && c.program == "lb_from_netdev" {
        let ran = run_once(ebpf, "lb_xdp_from_netdev", &c.input);
        // XDP builds no answers: a case tc answers (or refuses to) is
        // left to it, untouched and uncounted.
        let to_tc = c.to_tc || c.verdict == TC_ACT_REDIRECT;
        if to_tc {
            assert_eq!(
                (ran.verdict, ran.seen),
                (XDP_PASS, false),
                "{}: XDP leaves it to tc, unmarked",
                c.name
            );
            assert_frame(c.name, &ran.frame, &c.input);
            assert_eq!(
                maps.verdicts()[V_XDP_TO_TC as usize],
                to_tc_before + 1,
                "{}: xdp_to_tc",
                c.name
            );
            let ran = run_once(ebpf, c.program, &c.input);
            check(c, c.program, &ran, c.verdict);
        } else {
            let want = match c.verdict {
                TC_ACT_OK => XDP_PASS,
                TC_ACT_SHOT => XDP_DROP,
                v => panic!("{}: no XDP verdict for tc's {v}", c.name),
            };
            check(c, "lb_xdp_from_netdev", &ran, want);
            if want == XDP_PASS {
                assert!(ran.seen, "{}: passed by XDP without its mark", c.name);
            }
        }
    } else {
        let ran = run_once(ebpf, c.program, &c.input);
        check(c, c.program, &ran, c.verdict);
    }
    if let (Some(v), Some(b)) = (c.counts, before) {
        assert_eq!(
            maps.verdicts()[v as usize],
            b + 1,
            "{}: verdict counter {v}",
            c.name
        );
    }
}

fn case(
    name: &'static str,
    program: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Want,
) -> Case {
    Case {
        name,
        program,
        input,
        verdict,
        output,
        counts: None,
        to_tc: false,
    }
}

#[test]
fn device_path_cases() {
    device_path(false, true);
}

/// The same cases with the XDP program in front of tc: every packet XDP
/// translates leaves it as tc would leave it; what XDP leaves to tc comes
/// out of tc as before.
#[test]
fn device_path_cases_in_xdp() {
    device_path(true, true);
}

/// The same cases with no node address known without a lookup (as under
/// an agent that never wrote `LB4_NODE_ADDRS_V1`, or the node's addresses
/// past the ones it holds): every address goes through the address map,
/// with the same outcome.
#[test]
fn device_path_cases_looking_up_every_address() {
    device_path(false, false);
}

#[test]
fn device_path_cases_in_xdp_looking_up_every_address() {
    device_path(true, false);
}

/// `node_addrs`: the node's addresses are in `LB4_NODE_ADDRS_V1`, as the
/// agent writes them.
fn device_path(xdp: bool, node_addrs: bool) {
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    for p in ["lb_from_netdev", "lb_to_netdev"] {
        let prog: &mut SchedClassifier = ebpf.program_mut(p).unwrap().try_into().unwrap();
        lbctl::datapath::load::verified(|| prog.load())
            .unwrap_or_else(|e| panic!("verifier rejects {p}: {e}"));
    }
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp_from_netdev")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| prog.load())
        .unwrap_or_else(|e| panic!("verifier rejects lb_xdp_from_netdev: {e}"));
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    let _rec = fixture::program(&pins, MANIFESTS, &node);
    let mut maps = ServiceMaps::open(&pins).unwrap();
    assert_eq!(maps.node_addrs().unwrap().list().count(), 1);
    if !node_addrs {
        maps.set_node_addrs(Default::default()).unwrap();
    }
    // Two service CIDRs, as the agent writes them from --service-cidr or
    // the API's ServiceCIDR objects.
    let mut config = lb_common::config::Config::default();
    config.set_service_cidrs(&[
        (Ipv4Addr::new(10, 96, 0, 0).to_bits(), 12),
        (Ipv4Addr::new(172, 30, 0, 0).to_bits(), 16),
    ]);
    // The port map is whole (the translation wrote it): a packet to a port
    // no frontend uses leaves at once, as under the agent.
    config.flags |= lb_common::config::CFG_PORTS;
    maps.set_config(config).unwrap();

    let cl = (CLIENT, 40000);
    let np = (NODE, 30080);
    let be = (WEB_POD, 8080);
    let syn = Frame::tcp(cl, np, SYN);
    let ack = Frame::tcp(cl, np, ACK);
    let fin = Frame::tcp(cl, np, FIN | ACK);
    let synack = Frame::tcp(be, cl, SYN | ACK);
    let mut with_options = Frame::tcp((CLIENT, 40001), np, SYN);
    with_options.options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    // A 3,000-byte datagram to the UDP NodePort in three fragments, its
    // answer in two; each compared with the translated datagram cut the
    // same way by the test's own builder.
    let mut big = Frame::udp((CLIENT, 5010), (NODE, 30053));
    big.ip_id = 0x1234;
    big.payload = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let big_in = big.fragments(1480);
    let big_out = big.with((CLIENT, 5010), (DNS_POD, 5353)).fragments(1480);
    let mut answer = Frame::udp((DNS_POD, 5353), (CLIENT, 5010));
    answer.ip_id = 0x4321;
    answer.payload = (0..2000u32).map(|i| (i * 13 % 241) as u8).collect();
    let answer_in = answer.fragments(1480);
    let answer_out = answer.with((NODE, 30053), (CLIENT, 5010)).fragments(1480);
    let mut stray = big.clone();
    stray.ip_id = 0x5555;
    let stray = stray.fragments(1480);
    let mut tcp_first = Frame::tcp((CLIENT, 40002), np, SYN | 0x08);
    tcp_first.ip_id = 0x0777;
    tcp_first.payload = vec![0x5a; 44];
    let tcp_first_in = tcp_first.fragments(32);
    let tcp_first_out = tcp_first.with((CLIENT, 40002), be).fragments(32);
    let mut udp = Frame::udp((CLIENT, 5000), (NODE, 30053));
    udp.payload = b"query".to_vec();
    let mut udp_nocsum = Frame::udp((CLIENT, 5001), (NODE, 30053));
    udp_nocsum.udp_zero_csum = true;
    let other = Frame::tcp(cl, (NODE, 22), SYN);
    let empty_syn = Frame::tcp(cl, (NODE, 30099), SYN);
    let mut empty_ack = Frame::tcp((CLIENT, 40010), (NODE, 30099), ACK | 0x08);
    empty_ack.ack_seq = Some(777_777);
    let empty_udp = Frame::udp((CLIENT, 5003), (NODE, 30099));
    let undefined = Frame::tcp(cl, (Ipv4Addr::new(10, 96, 0, 10), 81), SYN);

    let mut vlan = syn.bytes();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
    let mut ipv6 = syn.bytes();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut arp = syn.bytes();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);

    let mut cases = vec![
        Case {
            counts: Some(V_FORWARD_NEW),
            ..case(
                "TCP SYN to a NodePort: DNAT to the local backend",
                "lb_from_netdev",
                syn.bytes(),
                TC_ACT_OK,
                Want::Frame(syn.with(cl, be).bytes()),
            )
        },
        Case {
            counts: Some(V_FORWARD_ESTABLISHED),
            ..case(
                "established ACK: same backend",
                "lb_from_netdev",
                ack.bytes(),
                TC_ACT_OK,
                Want::Frame(ack.with(cl, be).bytes()),
            )
        },
        Case {
            counts: Some(V_REPLY),
            ..case(
                "reply from the backend leaves with the NodePort as source",
                "lb_to_netdev",
                synack.bytes(),
                TC_ACT_OK,
                Want::Frame(synack.with(np, cl).bytes()),
            )
        },
        case(
            "FIN from the client: same backend",
            "lb_from_netdev",
            fin.bytes(),
            TC_ACT_OK,
            Want::Frame(fin.with(cl, be).bytes()),
        ),
        case(
            "externalIP: DNAT to the same Service's backend",
            "lb_from_netdev",
            Frame::tcp((CLIENT, 40010), (EXTERNAL_IP, 80), SYN).bytes(),
            TC_ACT_OK,
            Want::Frame(Frame::tcp((CLIENT, 40010), be, SYN).bytes()),
        ),
        case(
            "IP options (IHL 6): translated, options kept",
            "lb_from_netdev",
            with_options.bytes(),
            TC_ACT_OK,
            Want::Frame(with_options.with((CLIENT, 40001), be).bytes()),
        ),
        case(
            "UDP to a NodePort: DNAT",
            "lb_from_netdev",
            udp.bytes(),
            TC_ACT_OK,
            Want::Frame(udp.with((CLIENT, 5000), (DNS_POD, 5353)).bytes()),
        ),
        case(
            "UDP with checksum 0 keeps checksum 0",
            "lb_from_netdev",
            udp_nocsum.bytes(),
            TC_ACT_OK,
            Want::Frame(udp_nocsum.with((CLIENT, 5001), (DNS_POD, 5353)).bytes()),
        ),
        case(
            "UDP reply back to the NodePort",
            "lb_to_netdev",
            Frame::udp((DNS_POD, 5353), (CLIENT, 5000)).bytes(),
            TC_ACT_OK,
            Want::Frame(Frame::udp((NODE, 30053), (CLIENT, 5000)).bytes()),
        ),
        Case {
            counts: Some(V_ICMP_TRANSLATED),
            ..case(
                "the local backend's port unreachable about the datagram: from the NodePort, quoting what the client sent",
                "lb_to_netdev",
                Frame::icmp_error_for(&udp.with((CLIENT, 5000), (DNS_POD, 5353)), 3, 3).bytes(),
                TC_ACT_OK,
                Want::Frame(Frame::icmp_error_for(&udp, 3, 3).bytes()),
            )
        },
        Case {
            counts: Some(V_PASS_NOT_SERVICE),
            to_tc: true,
            ..case(
                "an ICMP error about no flow of ours: untouched",
                "lb_from_netdev",
                Frame::icmp_error_for(&Frame::udp((NODE, 5999), (CLIENT, 53)), 3, 3).bytes(),
                TC_ACT_OK,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_REJECT_NO_BACKEND),
            ..case(
                "TCP SYN to a Service without endpoints: a RST back",
                "lb_from_netdev",
                empty_syn.bytes(),
                TC_ACT_REDIRECT,
                Want::Frame(Frame::rst_for(&empty_syn).bytes()),
            )
        },
        Case {
            counts: Some(V_REJECT_NO_BACKEND),
            ..case(
                "TCP ACK to a Service without endpoints: a RST from its ACK",
                "lb_from_netdev",
                empty_ack.bytes(),
                TC_ACT_REDIRECT,
                Want::Frame(Frame::rst_for(&empty_ack).bytes()),
            )
        },
        Case {
            counts: Some(V_DROP_NO_BACKEND),
            to_tc: true,
            ..case(
                "TCP RST to a Service without endpoints: never answered",
                "lb_from_netdev",
                Frame::tcp(cl, (NODE, 30099), RST).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_REJECT_NO_BACKEND),
            ..case(
                "UDP to a Service without endpoints: ICMP port unreachable",
                "lb_from_netdev",
                empty_udp.bytes(),
                TC_ACT_REDIRECT,
                Want::Frame(Frame::icmp_error_for(&empty_udp, 3, 3).bytes()),
            )
        },
        Case {
            counts: Some(V_REJECT_UNDEFINED_PORT),
            ..case(
                "TCP SYN to a ClusterIP port no Service defines: a RST back",
                "lb_from_netdev",
                undefined.bytes(),
                TC_ACT_REDIRECT,
                Want::Frame(Frame::rst_for(&undefined).bytes()),
            )
        },
        Case {
            counts: Some(V_FORWARD_NEW),
            ..case(
                "LoadBalancer IP with source ranges, from inside them: DNAT",
                "lb_from_netdev",
                Frame::tcp(cl, (LB_IP, 80), SYN).bytes(),
                TC_ACT_OK,
                Want::Frame(Frame::tcp(cl, (RANGED_POD, 8080), SYN).bytes()),
            )
        },
        Case {
            counts: Some(V_DROP_SOURCE_RANGE),
            ..case(
                "LoadBalancer IP with source ranges, from outside them: dropped",
                "lb_from_netdev",
                Frame::tcp((OUTSIDER, 40000), (LB_IP, 80), SYN).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_FORWARD_NEW),
            ..case(
                "its NodePort from outside the ranges: not subject to them (kube-proxy)",
                "lb_from_netdev",
                Frame::tcp((OUTSIDER, 40000), (NODE, 30070), SYN).bytes(),
                TC_ACT_OK,
                Want::Frame(Frame::tcp((OUTSIDER, 40000), (RANGED_POD, 8080), SYN).bytes()),
            )
        },
        Case {
            counts: Some(V_DROP_UNALLOCATED_SERVICE_IP),
            ..case(
                "an address of the service CIDR no Service has: dropped",
                "lb_from_netdev",
                Frame::tcp(cl, (Ipv4Addr::new(10, 111, 255, 7), 80), SYN).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_DROP_UNALLOCATED_SERVICE_IP),
            ..case(
                "an address of the second service CIDR: dropped",
                "lb_from_netdev",
                Frame::udp((CLIENT, 5000), (Ipv4Addr::new(172, 30, 9, 9), 53)).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_DROP_UNALLOCATED_SERVICE_IP),
            ..case(
                "a port no frontend uses, to an address of the service CIDR: still dropped",
                "lb_from_netdev",
                Frame::tcp(cl, (Ipv4Addr::new(10, 111, 0, 3), 4444), SYN).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_PASS_NOT_SERVICE),
            ..case(
                "just outside the service CIDR: untouched",
                "lb_from_netdev",
                Frame::tcp(cl, (Ipv4Addr::new(10, 112, 0, 1), 80), SYN).bytes(),
                TC_ACT_OK,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_DROP_NO_LOCAL_BACKEND),
            ..case(
                "externalTrafficPolicy Local, no endpoint on this node: dropped",
                "lb_from_netdev",
                Frame::tcp(cl, (NODE, 30077), SYN).bytes(),
                TC_ACT_SHOT,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_PASS_NOT_SERVICE),
            ..case(
                "not a Service: untouched",
                "lb_from_netdev",
                other.bytes(),
                TC_ACT_OK,
                Want::Same,
            )
        },
        case(
            "egress packet of no flow: untouched",
            "lb_to_netdev",
            other.bytes(),
            TC_ACT_OK,
            Want::Same,
        ),
        Case {
            counts: Some(V_PASS_FRAGMENT_UNKNOWN),
            ..case(
                "a later fragment whose first was not seen: left to the stack",
                "lb_from_netdev",
                stray[1].clone(),
                TC_ACT_OK,
                Want::Same,
            )
        },
        Case {
            counts: Some(V_FORWARD_NEW),
            ..case(
                "first fragment of a datagram to a NodePort: DNAT, the UDP checksum covering the whole datagram fixed",
                "lb_from_netdev",
                big_in[0].clone(),
                TC_ACT_OK,
                Want::Frame(big_out[0].clone()),
            )
        },
        Case {
            counts: Some(V_FORWARD_ESTABLISHED),
            ..case(
                "second fragment: the first's flow, addresses only",
                "lb_from_netdev",
                big_in[1].clone(),
                TC_ACT_OK,
                Want::Frame(big_out[1].clone()),
            )
        },
        Case {
            counts: Some(V_FORWARD_ESTABLISHED),
            ..case(
                "last fragment: the same",
                "lb_from_netdev",
                big_in[2].clone(),
                TC_ACT_OK,
                Want::Frame(big_out[2].clone()),
            )
        },
        Case {
            counts: Some(V_REPLY),
            ..case(
                "first fragment of the answer: source back to the NodePort",
                "lb_to_netdev",
                answer_in[0].clone(),
                TC_ACT_OK,
                Want::Frame(answer_out[0].clone()),
            )
        },
        Case {
            counts: Some(V_REPLY),
            ..case(
                "last fragment of the answer: the same",
                "lb_to_netdev",
                answer_in[1].clone(),
                TC_ACT_OK,
                Want::Frame(answer_out[1].clone()),
            )
        },
        Case {
            counts: Some(V_FORWARD_NEW),
            ..case(
                "a TCP segment in fragments (the header in the first): both translated",
                "lb_from_netdev",
                tcp_first_in[0].clone(),
                TC_ACT_OK,
                Want::Frame(tcp_first_out[0].clone()),
            )
        },
        case(
            "its later fragment",
            "lb_from_netdev",
            tcp_first_in[1].clone(),
            TC_ACT_OK,
            Want::Frame(tcp_first_out[1].clone()),
        ),
        case(
            "VLAN-tagged: untouched",
            "lb_from_netdev",
            vlan,
            TC_ACT_OK,
            Want::Same,
        ),
        case(
            "IPv6: untouched",
            "lb_from_netdev",
            ipv6,
            TC_ACT_OK,
            Want::Same,
        ),
        case(
            "ARP: untouched",
            "lb_from_netdev",
            arp,
            TC_ACT_OK,
            Want::Same,
        ),
    ];
    // Truncated at every header boundary (and inside each header): passed
    // untouched. The kernel's PROG_TEST_RUN itself refuses (EINVAL) an
    // IPv4 frame shorter than an IPv4 header, so truncation starts there;
    // an IHL claiming options the frame does not hold covers the rest.
    let full = Frame::tcp((CLIENT, 40020), np, SYN).bytes();
    for (len, name) in [
        (34, "truncated after IPv4"),
        (38, "truncated after the TCP ports"),
        (44, "truncated inside TCP"),
        (53, "truncated one byte short of a TCP header"),
    ] {
        cases.push(case(
            name,
            "lb_from_netdev",
            full[..len].to_vec(),
            TC_ACT_OK,
            Want::Same,
        ));
    }
    let udp_full = Frame::udp((CLIENT, 5002), (NODE, 30053)).bytes();
    cases.push(case(
        "UDP truncated inside its header",
        "lb_from_netdev",
        udp_full[..40].to_vec(),
        TC_ACT_OK,
        Want::Same,
    ));
    let mut bad_ihl = full[..40].to_vec();
    bad_ihl[14] = 0x4f; // IHL 15: 60 bytes of IPv4 header claimed, 26 present
    cases.push(case(
        "IHL longer than the frame",
        "lb_from_netdev",
        bad_ihl,
        TC_ACT_OK,
        Want::Same,
    ));
    let mut tiny_ihl = full.clone();
    tiny_ihl[14] = 0x44; // IHL 4: shorter than an IPv4 header
    cases.push(case(
        "IHL below 5",
        "lb_from_netdev",
        tiny_ihl,
        TC_ACT_OK,
        Want::Same,
    ));
    for c in &cases {
        run(&mut ebpf, &maps, c, xdp);
    }

    // Per-backend counters: the web pod got the SYN, the externalIP SYN,
    // the SYN with options and the fragmented segment as new flows, and
    // those plus the ACK, the SYN-ACK reply, the FIN and the segment's
    // second fragment as packets; the DNS pod three UDP flows (one in
    // fragments) and the replies, every fragment a packet.
    let id_of = |addr: Ipv4Addr, port: u16| {
        let st = lbctl::agent::apply::MapWriter::read(&maps).unwrap();
        *st.backends
            .iter()
            .find(|(_, b)| b.addr == lb_common::ip4(addr.octets()) && b.port == port.to_be())
            .unwrap_or_else(|| panic!("backend {addr}:{port}"))
            .0
    };
    let frames_len = |f: &[Vec<u8>]| f.iter().map(Vec::len).sum::<usize>();
    let web_len = syn.bytes().len() * 4
        + synack.bytes().len()
        + with_options.bytes().len()
        + frames_len(&tcp_first_in);
    let web = maps.backend_stats(id_of(WEB_POD, 8080));
    assert_eq!(
        (web.flows, web.packets, web.bytes),
        (4, 8, web_len as u64),
        "web backend counters"
    );
    let dns = maps.backend_stats(id_of(DNS_POD, 5353));
    let dns_len = udp.bytes().len()
        + udp_nocsum.bytes().len()
        + udp_nocsum.bytes().len()
        + frames_len(&big_in)
        + frames_len(&answer_in);
    assert_eq!(
        (dns.flows, dns.packets, dns.bytes),
        (3, 8, dns_len as u64),
        "DNS backend counters"
    );

    // sessionAffinity ClientIP: every new flow of one client (40 source
    // ports) goes to one backend; other clients spread over the four.
    let program = if xdp {
        "lb_xdp_from_netdev"
    } else {
        "lb_from_netdev"
    };
    let mut dst_of = |src: (Ipv4Addr, u16)| {
        let input = Frame::tcp(src, (NODE, 30088), SYN).bytes();
        let ran = run_once(&mut ebpf, program, &input);
        let ok = if xdp { XDP_PASS } else { TC_ACT_OK };
        assert_eq!(ran.verdict, ok, "{}", describe(&ran.frame));
        let out = ran.frame;
        Ipv4Addr::new(out[30], out[31], out[32], out[33])
    };
    let one: std::collections::BTreeSet<Ipv4Addr> =
        (0..40).map(|i| dst_of((CLIENT, 41000 + i))).collect();
    assert_eq!(one.len(), 1, "one client, several backends: {one:?}");
    let many: std::collections::BTreeSet<Ipv4Addr> = (0..40)
        .map(|i| dst_of((Ipv4Addr::new(192, 168, 60, i as u8 + 1), 41000)))
        .collect();
    assert_eq!(many.len(), 4, "clients not spread: {many:?}");
    let entries = maps.affinity.keys().filter_map(Result::ok).count();
    assert_eq!(entries, 41, "one affinity entry per client");
}

/// `struct __sk_buff` as PROG_TEST_RUN's context: only the fields the
/// kernel lets a test set are filled (offsets from the UAPI header).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx
}

/// `struct xdp_md` as PROG_TEST_RUN's context: the frame's length as
/// data_end (the kernel checks it) and the device it came in on.
fn xdp_ctx(ifindex: u32, len: usize) -> Vec<u8> {
    let mut ctx = vec![0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes()); // data_end
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
    ctx
}

/// A NodePort whose only backend is on another node: the first packet is
/// DNATed and SNATed to the node and redirected towards the other node; the
/// backend's reply to the node is translated back to the client and
/// redirected towards it. FIB lookups need routes, so the programs run in a
/// namespace with a device, routes and fixed neighbours.
#[test]
fn snat_to_a_backend_on_another_node_both_ways() {
    snat_both_ways(false);
}

/// The same with XDP in front: what it sends leaves by `XDP_TX` as tc's
/// redirect would have sent it; the answers it cannot build (ICMP errors,
/// fragmentation needed) come from tc, the packet left to it untouched.
#[test]
fn snat_to_a_backend_on_another_node_both_ways_in_xdp() {
    snat_both_ways(true);
}

/// What became of a packet, whichever program did it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Fate {
    /// Out towards the FIB's next hop (tc redirect, XDP_TX).
    Sent,
    Dropped,
    Other(u32),
}

/// MAC addresses of the node namespace's device and its neighbours.
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A node for FIB lookups: a namespace whose eth0 (172.18.0.2) has a
/// route to node-b's pod CIDR (10.244.2.0/24 via 172.18.0.3) and to the
/// clients (192.168.50.0/24 via the router 172.18.0.1), with fixed
/// neighbours, forwarding on.
struct NodeNs {
    ns: lb_tests::guard::Netns,
    /// The other end of eth0.
    peer: lb_tests::guard::Netns,
    ifindex: u32,
    netns_path: String,
}

impl NodeNs {
    fn new() -> Self {
        use lb_tests::guard::Netns;
        let ns = Netns::new("dp");
        let peer = Netns::new("dq");
        let ipn = |args: &[&str]| {
            let mut all = vec!["-n", ns.name.as_str()];
            all.extend_from_slice(args);
            lb_tests::guard::run("ip", &all);
        };
        ipn(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
        ]);
        ipn(&["link", "set", "eth0", "address", "02:00:00:00:00:02", "up"]);
        ipn(&["addr", "add", "172.18.0.2/24", "dev", "eth0"]);
        for (addr, mac) in [
            ("172.18.0.3", "02:00:00:00:00:03"),
            ("172.18.0.1", "02:00:00:00:00:01"),
        ] {
            ipn(&[
                "neigh",
                "add",
                addr,
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
        ipn(&["route", "add", "10.244.2.0/24", "via", "172.18.0.3"]);
        ipn(&["route", "add", "192.168.50.0/24", "via", "172.18.0.1"]);
        // A node forwards (the FIB lookup refuses otherwise, as on a real
        // node without ip_forward).
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ifindex: u32 = ns
            .run(&["cat", "/sys/class/net/eth0/ifindex"])
            .trim()
            .parse()
            .unwrap();
        let netns_path = format!("/run/netns/{}", ns.name);
        Self {
            ns,
            peer,
            ifindex,
            netns_path,
        }
    }
}

/// Runs `f` on a thread in the namespace at `path` (PROG_TEST_RUN runs
/// in the calling thread's network namespace).
fn in_netns(path: &str, f: impl FnOnce() + Send + 'static) {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a valid namespace fd.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f();
    })
    .join()
    .expect("test thread");
}

fn snat_both_ways(xdp: bool) {
    require_root();
    sweep();
    const TC_ACT_REDIRECT: u32 = 7;
    const XDP_TX: u32 = 3;
    let NodeNs {
        ns: _ns,
        peer,
        ifindex,
        netns_path,
    } = NodeNs::new();
    let node_mac = NODE_MAC;
    let node_b_mac = NODE_B_MAC;
    let router_mac = ROUTER_MAC;

    // Loading pins the maps the fixture then programs.
    let (fs, _pinned) = fixture::datapath();
    let pins = fs.pins();
    let remote = MANIFESTS.replace(
        "endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]",
        "endpoints: [{addresses: [10.244.2.11], nodeName: node-b}]",
    );
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    let _rec = fixture::program(&pins, &remote, &node);

    let pins2 = pins.clone();
    in_netns(&netns_path, move || {
        let pins = pins2;
        let ebpf = std::cell::RefCell::new(device_programs(&pins));
        let ctx = skb_ctx(ifindex);
        let tc = |frame: &[u8]| {
            let mut ebpf = ebpf.borrow_mut();
            let prog: &mut SchedClassifier = ebpf
                .program_mut("lb_from_netdev")
                .unwrap()
                .try_into()
                .unwrap();
            let mut out = vec![0u8; frame.len() + 64];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })
                .expect("PROG_TEST_RUN");
            out.truncate(r.data_size_out as usize);
            let fate = match r.return_value {
                TC_ACT_REDIRECT => Fate::Sent,
                TC_ACT_SHOT => Fate::Dropped,
                v => Fate::Other(v),
            };
            (fate, out)
        };
        // XDP first; what it leaves to tc (unmarked, untouched) goes on
        // to tc. Returns the fate, the frame and whether tc decided.
        let run3 = |frame: &[u8]| {
            if !xdp {
                let (fate, out) = tc(frame);
                return (fate, out, false);
            }
            let (verdict, out) = {
                let mut ebpf = ebpf.borrow_mut();
                let prog: &mut Xdp = ebpf
                    .program_mut("lb_xdp_from_netdev")
                    .unwrap()
                    .try_into()
                    .unwrap();
                let ctx = xdp_ctx(ifindex, frame.len());
                let mut out = vec![0u8; frame.len() + 64];
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        ..Default::default()
                    })
                    .expect("PROG_TEST_RUN (XDP)");
                out.truncate(r.data_size_out as usize);
                (r.return_value, out)
            };
            match verdict {
                XDP_TX => (Fate::Sent, out, false),
                XDP_DROP => (Fate::Dropped, out, false),
                XDP_PASS if out == frame => {
                    let (fate, out) = tc(frame);
                    (fate, out, true)
                }
                v => (Fate::Other(v), out, false),
            }
        };
        // The fast cases: decided where they came in (XDP with XDP on).
        let run = |frame: &[u8]| {
            let (fate, out, via_tc) = run3(frame);
            assert!(!via_tc, "left to tc\n{}", describe(&out));
            (fate, out)
        };
        let cl = (CLIENT, 40000);
        let backend = (Ipv4Addr::new(10, 244, 2, 11), 8080);
        let src_port = |out: &[u8]| u16::from_be_bytes([out[34], out[35]]);

        let mut syn = Frame::tcp(cl, (NODE, 30080), SYN);
        syn.dst_mac = node_mac;
        let (verdict, out) = run(&syn.bytes());
        assert_eq!(
            verdict,
            Fate::Sent,
            "SNATed SYN is redirected\n{}",
            describe(&out)
        );
        // The source port comes from the SNAT range (default 61000-65535
        // until the agent writes its configuration).
        let port = src_port(&out);
        assert!((61000..=65535).contains(&port), "SNAT port {port}");
        let mut want = syn.with((NODE, port), backend);
        want.src_mac = node_mac;
        want.dst_mac = node_b_mac;
        assert_frame(
            "NodePort SYN to a remote backend: DNAT + SNAT to the node",
            &out,
            &want.bytes(),
        );

        // The SYN again (its SYN-ACK was lost): the same flow, through
        // the same SNAT port. XDP chooses a SYN's backend and SNAT port
        // before it reads the flow table; what it finds there wins, and
        // no second reply entry is made.
        let (verdict, again) = run(&syn.bytes());
        assert_eq!(verdict, Fate::Sent, "{}", describe(&again));
        assert_frame("the SYN retransmitted: the same translation", &again, &out);
        let entries = ServiceMaps::open(&pins)
            .unwrap()
            .conntrack
            .entries()
            .unwrap()
            .len();
        assert_eq!(entries, 2, "one flow, two directions");

        let mut reply = Frame::tcp(backend, (NODE, port), SYN | ACK);
        reply.dst_mac = node_mac;
        let mut want = reply.with((NODE, 30080), cl);
        want.src_mac = node_mac;
        want.dst_mac = router_mac;
        let (verdict, out) = run(&reply.bytes());
        assert_eq!(
            verdict,
            Fate::Sent,
            "reply is redirected\n{}",
            describe(&out)
        );
        assert_frame(
            "reply from the remote backend: back to the client from the NodePort",
            &out,
            &want.bytes(),
        );

        // A router towards the backend says the SYN was too big: the
        // client hears it from the NodePort, about the SYN it sent, and
        // can lower its path MTU.
        let translated = {
            let mut t = syn.with((NODE, port), backend);
            t.src_mac = node_mac;
            t.dst_mac = node_b_mac;
            t
        };
        let mut frag_needed = Frame::icmp_error_for(&translated, 3, 4);
        frag_needed.src = Ipv4Addr::new(10, 244, 2, 1);
        frag_needed.src_mac = node_b_mac;
        frag_needed.dst_mac = node_mac;
        let mut want = Frame::icmp_error_for(&syn, 3, 4);
        want.src_mac = node_mac;
        want.dst_mac = router_mac;
        let (verdict, out, via_tc) = run3(&frag_needed.bytes());
        assert_eq!((verdict, via_tc), (Fate::Sent, xdp), "{}", describe(&out));
        assert_frame(
            "fragmentation needed from a router on the backend's side: back to the client",
            &out,
            &want.bytes(),
        );

        // A segment too big for the route to node-b (MTU 1500), DF set:
        // a fragmentation needed back to the client, quoting it as sent,
        // so its path MTU discovery works through the NodePort.
        let mut big = Frame::tcp(cl, (NODE, 30080), ACK);
        big.dst_mac = node_mac;
        big.frag = 0x4000; // DF
        big.payload = vec![7; 1600];
        let mut want = Frame::icmp_error_with(&big, 3, 4, [0, 0, 0x05, 0xdc]);
        want.src_mac = node_mac;
        want.dst_mac = big.src_mac;
        let (verdict, out, via_tc) = run3(&big.bytes());
        assert_eq!((verdict, via_tc), (Fate::Sent, xdp), "{}", describe(&out));
        assert_frame(
            "a segment too big for the route: fragmentation needed, MTU 1500",
            &out,
            &want.bytes(),
        );

        // RST from the client: same translation, and the flow is closing.
        let mut rst = Frame::tcp(cl, (NODE, 30080), lb_tests::packet::RST);
        rst.dst_mac = node_mac;
        let mut want = rst.with((NODE, port), backend);
        want.src_mac = node_mac;
        want.dst_mac = node_b_mac;
        let (verdict, out) = run(&rst.bytes());
        assert_eq!(verdict, Fate::Sent);
        assert_frame("RST of the SNATed flow", &out, &want.bytes());

        // A SNAT range of four ports: four new flows get one each, the
        // fifth finds none (dropped, counted); once a flow's reply entry
        // has expired its port is given to the next flow.
        let mut maps = ServiceMaps::open(&pins).unwrap();
        maps.set_config(lb_common::config::Config {
            snat_port_min: 62000,
            snat_port_max: 62003,
            ..Default::default()
        })
        .unwrap();
        let syn_from = |p: u16| {
            let mut f = Frame::tcp((CLIENT, p), (NODE, 30080), SYN);
            f.dst_mac = node_mac;
            f.bytes()
        };
        let mut given = std::collections::BTreeSet::new();
        for p in 41000..41004 {
            let (verdict, out) = run(&syn_from(p));
            assert_eq!(verdict, Fate::Sent, "flow from port {p}");
            given.insert(src_port(&out));
        }
        assert_eq!(given, (62000..=62003).collect(), "each port once");
        let before = maps.verdicts()[V_DROP_NO_SNAT_PORT as usize];
        let (verdict, _) = run(&syn_from(41004));
        assert_eq!(verdict, Fate::Dropped, "no free SNAT port");
        assert_eq!(maps.verdicts()[V_DROP_NO_SNAT_PORT as usize], before + 1);
        // The reply entry of port 62002 expires (as after its lifetime).
        let rkey = tcp_ct_key(backend, (NODE, 62002), CT_REPLY);
        let mut e = maps
            .conntrack
            .get(&rkey)
            .unwrap()
            .expect("reply entry of 62002");
        e.last_seen_s = e.last_seen_s.wrapping_sub(e.lifetime_s + 1);
        maps.conntrack.insert(&rkey, &e).unwrap();
        let (verdict, out) = run(&syn_from(41005));
        assert_eq!(verdict, Fate::Sent, "an expired port is free again");
        assert_eq!(src_port(&out), 62002);
        // A closed connection's port waits out the backend's TIME_WAIT
        // (60 s after its last packet), even once its entry expired.
        let mut rkey = rkey;
        rkey.dst_port = 62001u16.to_be();
        let mut e = maps
            .conntrack
            .get(&rkey)
            .unwrap()
            .expect("reply entry of 62001");
        e.flags |= lb_common::conntrack::CT_CLOSING;
        e.lifetime_s = lb_common::conntrack::CT_LIFETIME_TCP_CLOSING;
        e.last_seen_s = e.last_seen_s.wrapping_sub(e.lifetime_s + 1);
        maps.conntrack.insert(&rkey, &e).unwrap();
        let (verdict, _) = run(&syn_from(41006));
        assert_eq!(verdict, Fate::Dropped, "a port in TIME_WAIT is not given");
        e.last_seen_s = e
            .last_seen_s
            .wrapping_sub(lb_common::conntrack::CT_TIME_WAIT_S);
        maps.conntrack.insert(&rkey, &e).unwrap();
        let (verdict, out) = run(&syn_from(41007));
        assert_eq!(verdict, Fate::Sent, "after TIME_WAIT it is");
        assert_eq!(src_port(&out), 62001);
        maps.set_config(Default::default()).unwrap();
    });
    let maps = ServiceMaps::open(&fs.pins()).unwrap();
    let closing = maps
        .conntrack
        .entries()
        .unwrap()
        .into_iter()
        .filter(|(_, e)| {
            e.flags & lb_common::conntrack::CT_CLOSING != 0
                && e.lifetime_s == lb_common::conntrack::CT_LIFETIME_TCP_CLOSING
        })
        .count();
    assert_eq!(closing, 2, "both directions of the reset flow are closing");
    drop(peer);
}

fn moving(endpoints: &[(u8, bool)]) -> String {
    let mut y = String::from(
        r#"
apiVersion: v1
kind: Service
metadata: {name: moving, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.60
  ports:
  - {name: http, port: 80, nodePort: 30060}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30061}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: moving-1, namespace: demo, labels: {kubernetes.io/service-name: moving}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
"#,
    );
    for (last, ready) in endpoints {
        y += &format!(
            "- {{addresses: [10.244.1.{last}], nodeName: node-a, conditions: {{ready: {ready}}}}}\n"
        );
    }
    y
}

/// A flow never outlives its backend: once the backend leaves the
/// Service, the next TCP segment of its connection gets a RST back (the
/// flow's entries removed) and the next datagram of a UDP flow goes to a
/// live backend; a SYN on the same tuple starts afresh. A backend that is
/// only not ready keeps its TCP connections (as with kube-proxy) and loses
/// its UDP flows.
#[test]
fn flows_whose_backend_left_end_or_move() {
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    // Five: after two leave and two more stop being ready, one serves.
    let all = [(41, true), (42, true), (43, true), (44, true), (45, true)];
    let _rec = fixture::program(&pins, &moving(&all), &node);
    let maps = ServiceMaps::open(&pins).unwrap();
    let prog: &mut SchedClassifier = ebpf
        .program_mut("lb_from_netdev")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| prog.load()).unwrap();
    let send = |f: &Frame, counts: u32| {
        let before = maps.verdicts()[counts as usize];
        let input = f.bytes();
        let mut out = vec![0u8; input.len() + 128];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        assert_eq!(
            maps.verdicts()[counts as usize],
            before + 1,
            "verdict {counts} not counted for\n{}",
            describe(&input)
        );
        (r.return_value, out)
    };
    let dst = |out: &[u8]| out[33];
    let tcp_cl = (CLIENT, 40100);
    let udp_cl = (CLIENT, 5100);
    let (rc, out) = send(&Frame::tcp(tcp_cl, (NODE, 30060), SYN), V_FORWARD_NEW);
    assert_eq!(rc, TC_ACT_OK);
    let tcp_be = dst(&out);
    let (_, out) = send(&Frame::udp(udp_cl, (NODE, 30061)), V_FORWARD_NEW);
    let udp_be = dst(&out);

    // Both backends leave the Service.
    let left: Vec<(u8, bool)> = all
        .iter()
        .copied()
        .filter(|(l, _)| *l != tcp_be && *l != udp_be)
        .collect();
    let _rec = fixture::program(&pins, &moving(&left), &node);
    let mut ack = Frame::tcp(tcp_cl, (NODE, 30060), ACK);
    ack.ack_seq = Some(4242);
    let (rc, out) = send(&ack, V_RESET_BACKEND_GONE);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_frame(
        "a segment of a connection whose backend left: a RST back",
        &out,
        &Frame::rst_for(&ack).bytes(),
    );
    let (rc, out) = send(&Frame::udp(udp_cl, (NODE, 30061)), V_FORWARD_RENEWED);
    assert_eq!(rc, TC_ACT_OK);
    let moved = dst(&out);
    assert!(
        left.iter().any(|(l, _)| *l == moved),
        "UDP flow moved to {moved}, not a live backend"
    );
    // The reset connection's entries are gone: its tuple starts afresh.
    let (rc, out) = send(&Frame::tcp(tcp_cl, (NODE, 30060), SYN), V_FORWARD_NEW);
    assert_eq!(rc, TC_ACT_OK);
    let tcp_now = dst(&out);
    assert!(left.iter().any(|(l, _)| *l == tcp_now));

    // The backends of both flows stop being ready (not serving): the TCP
    // connection goes on, the UDP flow moves to one still ready.
    let not_ready: Vec<(u8, bool)> = left
        .iter()
        .map(|(l, _)| (*l, *l != tcp_now && *l != moved))
        .collect();
    let _rec = fixture::program(&pins, &moving(&not_ready), &node);
    let (rc, out) = send(
        &Frame::tcp(tcp_cl, (NODE, 30060), ACK),
        V_FORWARD_ESTABLISHED,
    );
    assert_eq!((rc, dst(&out)), (TC_ACT_OK, tcp_now));
    let (rc, out) = send(&Frame::udp(udp_cl, (NODE, 30061)), V_FORWARD_RENEWED);
    assert_eq!(rc, TC_ACT_OK);
    assert!(not_ready.iter().any(|(l, r)| *r && *l == dst(&out)));
}

/// A pinned map whose size differs from what the agent wants (a restart
/// with `--conntrack-max`, or back to the default) is migrated, entries
/// included, never silently reused; a migration cut short (the old table
/// set aside, the new one not made yet) is undone on the next start.
#[test]
fn pinned_maps_of_another_size_are_migrated_with_their_entries() {
    use lb_common::{conntrack::Ct4Entry, maps::CONNTRACK4};
    use lbctl::datapath::{load, pins};
    require_root();
    sweep();
    let fs = lb_tests::guard::Bpffs::new();
    let dir = fs.pins();
    pins::prepare(&dir).unwrap();
    let size = |dir: &std::path::Path| {
        aya::maps::MapInfo::from_pin(dir.join(CONNTRACK4))
            .unwrap()
            .max_entries()
    };
    // What the previous release pinned: a 16-byte configuration record
    // (this one is 32 bytes), under the same name.
    pin_map(&dir.join(lb_common::maps::CONFIG), 2, 4, 16, 1);
    let (ebpf, migrated) = load::load_with(&dir, false, &Default::default()).unwrap();
    assert_eq!(migrated.len(), 1, "{migrated:?}");
    assert_eq!(
        (
            migrated[0].name.as_str(),
            migrated[0].old.value_size,
            migrated[0].copied
        ),
        (lb_common::maps::CONFIG, 16, None),
        "another layout under the same name: recreated"
    );
    let default_size = size(&dir);
    let key = tcp_ct_key(
        (Ipv4Addr::new(192, 168, 50, 7), 40000),
        (Ipv4Addr::new(172, 18, 0, 2), 30080),
        CT_ORIGINAL,
    );
    let entry = Ct4Entry {
        backend_id: 7,
        lifetime_s: 60,
        ..Default::default()
    };
    {
        let maps = ServiceMaps::open(&dir).unwrap();
        maps.conntrack.insert(&key, &entry).unwrap();
    }
    drop(ebpf);

    let sizes = std::collections::BTreeMap::from([(CONNTRACK4.to_string(), 1024)]);
    let (ebpf, migrated) = load::load_with(&dir, false, &sizes).unwrap();
    assert_eq!(migrated.len(), 1, "{migrated:?}");
    assert_eq!(migrated[0].name, CONNTRACK4);
    assert_eq!(
        (
            migrated[0].old.max_entries,
            migrated[0].new.max_entries,
            migrated[0].copied
        ),
        (default_size, 1024, Some(1))
    );
    assert_eq!(size(&dir), 1024);
    let maps = ServiceMaps::open(&dir).unwrap();
    assert_eq!(maps.conntrack.get(&key).unwrap().unwrap(), entry);
    drop((ebpf, maps));

    // Killed after setting the old table aside: the next start puts it
    // back, then migrates it to the default size.
    let aside = lbctl::datapath::migrate::old_path(&dir, CONNTRACK4);
    lbctl::datapath::migrate::repin(&dir.join(CONNTRACK4), &aside).unwrap();
    let (_ebpf, migrated) = load::load_with(&dir, false, &Default::default()).unwrap();
    assert_eq!(migrated.len(), 1, "{migrated:?}");
    assert_eq!(size(&dir), default_size);
    assert!(!aside.exists());
    let maps = ServiceMaps::open(&dir).unwrap();
    assert_eq!(maps.conntrack.get(&key).unwrap().unwrap(), entry);
}

/// Backends an older agent left in a hash (`LB4_BACKENDS_V1` keyed by
/// id) are in the array indexed by id once the object is loaded, ids and
/// all, so the frontends and sets left pinned still name them; ids past
/// the array (the old ids ran to 2^28) do not fit, are counted and left
/// to the agent, which gives those backends new ids.
#[test]
fn backends_of_the_hash_layout_are_copied_into_the_array() {
    use lb_common::{maps::BACKENDS4, service::Backend4};
    use lbctl::{
        agent::apply::MapWriter,
        datapath::{load, pins},
    };
    require_root();
    sweep();
    let fs = lb_tests::guard::Bpffs::new();
    let dir = fs.pins();
    pins::prepare(&dir).unwrap();
    pin_map(&dir.join(BACKENDS4), 1, 4, 12, 1024); // BPF_MAP_TYPE_HASH
    let backend = |last: u8| Backend4 {
        addr: lb_common::ip4([10, 244, 1, last]),
        port: 8080u16.to_be(),
        proto: 6,
        ..Default::default()
    };
    {
        let data = aya::maps::MapData::from_pin(dir.join(BACKENDS4)).unwrap();
        let mut m: aya::maps::HashMap<_, u32, Backend4> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        for (id, last) in [(1, 1), (77, 2), (1 << 20, 3)] {
            m.insert(id, backend(last), 0).unwrap();
        }
    }
    let (_ebpf, migrated) = load::load_with(&dir, false, &Default::default()).unwrap();
    let m = migrated
        .iter()
        .find(|m| m.name == BACKENDS4)
        .expect("migrated");
    assert_eq!((m.old.map_type, m.new.map_type), (1, 2), "hash to array");
    assert_eq!((m.copied, m.dropped), (Some(2), 1), "{m:?}");
    let maps = ServiceMaps::open(&dir).unwrap();
    let held = maps.read().unwrap().backends;
    assert_eq!(
        held,
        std::collections::BTreeMap::from([(1, backend(1)), (77, backend(2))]),
        "ids in the array kept, nothing else read as a backend"
    );
}

/// Flows an older agent left in `LB4_CT_V1` (a kernel LRU hash) are in
/// the set table once the object is loaded, before any program of this
/// agent runs, and the old map is unpinned: an upgrade keeps every flow
/// on its backend and every SNAT port held.
#[test]
fn flows_of_the_lru_layout_are_carried_into_the_set_table() {
    use lb_common::conntrack::{CT_SNAT, Ct4Entry, Ct4Key};
    use lbctl::datapath::{load, pins};
    require_root();
    sweep();
    let fs = lb_tests::guard::Bpffs::new();
    let dir = fs.pins();
    pins::prepare(&dir).unwrap();
    let old = dir.join(lb_common::maps::RETIRED_CONNTRACK4);
    pin_map(&old, 9, 16, 56, 4096); // BPF_MAP_TYPE_LRU_HASH
    let flows: Vec<(Ct4Key, Ct4Entry)> = (0..300u16)
        .map(|i| {
            let k = tcp_ct_key(
                (Ipv4Addr::new(192, 168, 50, 7), 40000 + i),
                (Ipv4Addr::new(172, 18, 0, 2), 30080),
                if i % 2 == 0 { CT_ORIGINAL } else { CT_REPLY },
            );
            let e = Ct4Entry {
                nat_dst_addr: lb_common::ip4([10, 244, 1, (i % 7) as u8]),
                backend_id: 1 + u32::from(i % 7),
                created_s: 100,
                last_seen_s: 100,
                lifetime_s: 3600,
                flags: CT_SNAT,
                packets: u64::from(i),
                ..Default::default()
            };
            (k, e)
        })
        .collect();
    {
        let data = aya::maps::MapData::from_pin(&old).unwrap();
        let mut m: aya::maps::HashMap<_, Ct4Key, Ct4Entry> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
        for (k, e) in &flows {
            m.insert(k, e, 0).unwrap();
        }
    }
    let (_ebpf, _) = load::load_with(&dir, false, &Default::default()).unwrap();
    assert!(!old.exists(), "the old map unpinned");
    let maps = ServiceMaps::open(&dir).unwrap();
    for (k, e) in &flows {
        assert_eq!(maps.conntrack.get(k).unwrap().as_ref(), Some(e), "{k:?}");
    }
    assert_eq!(maps.conntrack.entries().unwrap().len(), flows.len());
}

/// Backend sets an older agent left in `LB_SLOTS_V1` (one entry per slot)
/// are in `LB_SLOTS_V2` (16 slots an entry) once the object is loaded,
/// before any program or agent runs, and the old map is unpinned.
#[test]
fn backend_sets_of_the_first_layout_are_converted_on_load() {
    use lbctl::{
        agent::apply::MapWriter,
        datapath::{load, pins},
    };
    require_root();
    sweep();
    let fs = lb_tests::guard::Bpffs::new();
    let dir = fs.pins();
    pins::prepare(&dir).unwrap();
    let old = dir.join(lb_common::maps::RETIRED_SLOTS);
    pin_map(&old, 1, 8, 4, 1024); // BPF_MAP_TYPE_HASH, (set, slot) -> id
    {
        let data = aya::maps::MapData::from_pin(&old).unwrap();
        let mut m: aya::maps::HashMap<_, [u32; 2], u32> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        for slot in 0..20 {
            m.insert([3, slot], 100 + slot, 0).unwrap();
        }
        m.insert([8, 0], 7, 0).unwrap();
    }
    let (_ebpf, _) = load::load_with(&dir, false, &Default::default()).unwrap();
    assert!(!old.exists(), "the old map is unpinned");
    let st = ServiceMaps::open(&dir).unwrap().read().unwrap();
    assert_eq!(st.slots.len(), 3, "{}", st.dump());
    let set3: Vec<Option<u32>> = (0..21).map(|s| st.slot(3, s)).collect();
    let want: Vec<Option<u32>> = (0..21).map(|s| (s < 20).then_some(100 + s)).collect();
    assert_eq!(set3, want);
    assert_eq!((st.slot(8, 0), st.slot(8, 1)), (Some(7), None));
    // Loaded again (a restart): nothing to convert, the sets stay.
    let (_ebpf, _) = load::load_with(&dir, false, &Default::default()).unwrap();
    assert_eq!(ServiceMaps::open(&dir).unwrap().read().unwrap(), st);
}

/// Creates a map (`map_type`, sizes) and pins it at `path` (raw bpf(2): an
/// older release's map).
fn pin_map(
    path: &std::path::Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let create = Create {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &create as *const Create,
            std::mem::size_of::<Create>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let pin = Pin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_PIN.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &pin as *const Pin,
            std::mem::size_of::<Pin>(),
        )
    };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// Conntrack lifetimes follow the connection, checked with the clock moved
/// (entries' timestamps set back, no waiting): a SYN's flow lives 60 s, an
/// answered one 6 h; a FIN in one direction leaves the other open (still
/// established an hour later); FINs both ways make it closing (10 s); a
/// segment after that finds no flow and is a new flow by the hash (the
/// same backend while the set is unchanged), never passed untranslated;
/// a UDP flow lives 60 s after its last datagram.
#[test]
fn conntrack_lifetimes_follow_the_connection() {
    use lb_common::conntrack::{
        CT_CLOSING, CT_FIN_ORIGINAL, CT_LIFETIME_TCP_CLOSING, CT_LIFETIME_TCP_ESTABLISHED,
        CT_LIFETIME_TCP_SYN, CT_LIFETIME_UDP, Ct4Entry,
    };
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    for p in ["lb_from_netdev", "lb_to_netdev"] {
        let prog: &mut SchedClassifier = ebpf.program_mut(p).unwrap().try_into().unwrap();
        lbctl::datapath::load::verified(|| prog.load()).unwrap();
    }
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    let _rec = fixture::program(&pins, MANIFESTS, &node);
    let mut maps = ServiceMaps::open(&pins).unwrap();
    let mut send = |program: &str, f: &Frame| {
        let prog: &mut SchedClassifier = ebpf.program_mut(program).unwrap().try_into().unwrap();
        let input = f.bytes();
        let mut out = vec![0u8; input.len() + 128];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    };
    // Both entries of the flow from client port `port`.
    let entries = |maps: &ServiceMaps, port: u16| -> Vec<Ct4Entry> {
        maps.conntrack
            .entries()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.src_port == port.to_be() || k.dst_port == port.to_be())
            .map(|(_, e)| e)
            .collect()
    };
    let age = |maps: &mut ServiceMaps, port: u16, by: u32| {
        let keys: Vec<_> = maps
            .conntrack
            .entries()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.src_port == port.to_be() || k.dst_port == port.to_be())
            .collect();
        for (k, mut e) in keys {
            e.last_seen_s = e.last_seen_s.wrapping_sub(by);
            maps.conntrack.insert(&k, &e).unwrap();
        }
    };
    let lifetimes = |maps: &ServiceMaps, port| -> Vec<u32> {
        entries(maps, port).iter().map(|e| e.lifetime_s).collect()
    };
    let cl = (CLIENT, 45000);
    let np = (NODE, 30080);
    let be = (WEB_POD, 8080);
    let translated = Frame::tcp(cl, be, ACK).bytes();

    send("lb_from_netdev", &Frame::tcp(cl, np, SYN));
    assert_eq!(lifetimes(&maps, 45000), [CT_LIFETIME_TCP_SYN; 2]);
    send("lb_to_netdev", &Frame::tcp(be, cl, SYN | ACK));
    assert_eq!(lifetimes(&maps, 45000), [CT_LIFETIME_TCP_ESTABLISHED; 2]);
    // Half-close from the client: the backend may go on sending.
    send("lb_from_netdev", &Frame::tcp(cl, np, FIN | ACK));
    for e in entries(&maps, 45000) {
        assert_eq!(e.flags & (CT_FIN_ORIGINAL | CT_CLOSING), CT_FIN_ORIGINAL);
        assert_eq!(e.lifetime_s, CT_LIFETIME_TCP_ESTABLISHED);
    }
    age(&mut maps, 45000, 3600);
    let before = maps.verdicts()[V_REPLY as usize];
    let (rc, _) = send("lb_to_netdev", &Frame::tcp(be, cl, ACK));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        maps.verdicts()[V_REPLY as usize],
        before + 1,
        "an hour later, half-closed"
    );
    // The backend's FIN: closing, both ways.
    send("lb_to_netdev", &Frame::tcp(be, cl, FIN | ACK));
    assert_eq!(lifetimes(&maps, 45000), [CT_LIFETIME_TCP_CLOSING; 2]);
    age(&mut maps, 45000, CT_LIFETIME_TCP_CLOSING + 1);
    // A late segment: a new flow by the hash, translated all the same.
    let before = maps.verdicts()[V_FORWARD_NEW as usize];
    let (rc, out) = send("lb_from_netdev", &Frame::tcp(cl, np, ACK));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(maps.verdicts()[V_FORWARD_NEW as usize], before + 1);
    assert_frame("a segment after the flow expired", &out, &translated);

    // UDP: 60 s after the last datagram.
    let ucl = (CLIENT, 5400);
    let udp = Frame::udp(ucl, (NODE, 30053));
    send("lb_from_netdev", &udp);
    assert_eq!(lifetimes(&maps, 5400), [CT_LIFETIME_UDP; 2]);
    age(&mut maps, 5400, CT_LIFETIME_UDP - 1);
    let before = maps.verdicts()[V_FORWARD_ESTABLISHED as usize];
    send("lb_from_netdev", &udp);
    assert_eq!(
        maps.verdicts()[V_FORWARD_ESTABLISHED as usize],
        before + 1,
        "59 s idle: alive"
    );
    age(&mut maps, 5400, CT_LIFETIME_UDP + 1);
    let before = maps.verdicts()[V_FORWARD_NEW as usize];
    send("lb_from_netdev", &udp);
    assert_eq!(
        maps.verdicts()[V_FORWARD_NEW as usize],
        before + 1,
        "61 s idle: a new flow"
    );
}

/// Batched writes (one `bpf()` call per run of ops of one kind) leave the
/// pinned maps holding exactly what the reconciler's mirror says, through
/// a full sync of 300 Services, a change of half of them and a removal;
/// a backend's counters survive a change of its Service.
#[test]
fn batched_writes_leave_the_maps_as_the_mirror_says() {
    require_root();
    sweep();
    use lb_tests::bench::cluster;
    use lbctl::agent::{apply::MapWriter, model};
    let (fs, _ebpf) = fixture::datapath_for(3000);
    let pins = fs.pins();
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    let all = cluster::services(300, 10);
    let mut rec = fixture::program(&pins, &cluster::to_yaml(&all, "node-a"), &node);
    let read = |rec: &lbctl::agent::reconcile::Reconciler<ServiceMaps>| {
        rec.writer.read().expect("read the maps back")
    };
    assert_eq!(read(&rec), rec.state(), "after the full sync");
    assert_eq!(rec.state().backends.len(), 3000);
    // Batched reads in chunks of any size, including ones that end inside
    // a hash bucket, read every entry once.
    {
        use std::os::fd::AsFd;
        let fd = lbctl::datapath::link::open_pinned(&pins.join(lb_common::maps::SERVICE_BACKENDS))
            .expect("open the (Service port, backend) map");
        for chunk in [1, 7, 2999, 3000, 3001, 8192] {
            let got: Vec<(lb_common::service::ServiceBackendKey, u32)> =
                lbctl::datapath::batch::lookup_all(fd.as_fd(), chunk).expect("batched lookup");
            assert_eq!(got.len(), 3000, "chunk {chunk}: each entry once");
            let got: std::collections::BTreeMap<_, _> = got.into_iter().collect();
            assert_eq!(got, rec.state().svc_backends, "chunk {chunk}");
        }
    }

    // Counters of one backend, bumped as the datapath would.
    let maps = ServiceMaps::open(&pins).unwrap();
    let (&id, _) = rec.state().backends.iter().next().unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let mut stats: aya::maps::PerCpuHashMap<_, u32, lb_common::counters::BackendStats> =
        aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(
            aya::maps::MapData::from_pin(pins.join(lb_common::maps::BACKEND_STATS)).unwrap(),
        ))
        .unwrap();
    let bumped = lb_common::counters::BackendStats {
        flows: 7,
        packets: 9,
        bytes: 900,
    };
    stats
        .insert(
            id,
            aya::maps::PerCpuValues::try_from(vec![bumped; cpus]).unwrap(),
            0,
        )
        .unwrap();

    // Half the Services with one endpoint fewer and one more, a third
    // removed.
    let mut changed = all.clone();
    for (i, s) in changed.iter_mut().enumerate() {
        if i % 2 == 0 {
            s.endpoints.pop();
            s.endpoints.push((
                std::net::Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250) as u8 + 1),
                8080,
            ));
        }
    }
    changed.truncate(200);
    let desired = model::translate(&cluster::to_objects(&changed, "node-a"), &node);
    let o = rec.reconcile(&desired).expect("reconcile the change");
    assert!(o.writes > 1000, "{} writes", o.writes);
    assert_eq!(read(&rec), rec.state(), "after the change");
    let kept = maps.backend_stats(id);
    if rec.state().backends.contains_key(&id) {
        assert_eq!(
            (kept.flows, kept.packets, kept.bytes),
            (7 * cpus as u64, 9 * cpus as u64, 900 * cpus as u64),
            "a kept backend's counters"
        );
    }
}

/// `lb_sock_egress` (cgroup skb egress) under PROG_TEST_RUN: the verifier
/// takes it, and nothing but a guarded socket's first packet is ever
/// dropped or rewritten. The kernel gives a test skb a socket of its own
/// whose cookie no hook has translated, so every case here passes; the
/// drops (a pod outside the ranges: its SYN, its datagrams) are shown end
/// to end by `e2e_semantics::source_ranges_guard_the_load_balancer_ip`.
#[test]
fn socket_egress_passes_what_is_not_a_guarded_sockets_first_packet() {
    use aya::programs::CgroupSkb;
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    let _rec = fixture::program(&pins, MANIFESTS, &node);
    let maps = ServiceMaps::open(&pins).unwrap();
    let prog: &mut CgroupSkb = ebpf
        .program_mut("lb_sock_egress")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| prog.load())
        .unwrap_or_else(|e| panic!("verifier rejects lb_sock_egress: {e}"));
    const PASS: u32 = 1;
    let outside = (OUTSIDER, 41000);
    let be = (RANGED_POD, 8080);
    let mut later_fragment = Frame::udp(outside, be);
    later_fragment.frag = 185; // offset 1480, no L4 header in this one
    let syn = Frame::tcp(outside, be, SYN).bytes();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("a SYN of a socket no hook translated", syn.clone()),
        (
            "a datagram of a socket no hook translated",
            Frame::udp(outside, be).bytes(),
        ),
        (
            "an established flow's ACK",
            Frame::tcp(outside, be, ACK).bytes(),
        ),
        (
            "a server's SYN+ACK",
            Frame::tcp(outside, be, SYN | ACK).bytes(),
        ),
        ("a later fragment (no ports)", later_fragment.bytes()),
    ];
    // Truncated inside the TCP header: passed, never read past the end
    // (PROG_TEST_RUN refuses an IPv4 frame shorter than its IP header).
    for cut in [14 + 20, 14 + 20 + 1, 14 + 20 + 13] {
        cases.push(("truncated", syn[..cut].to_vec()));
    }
    let mut v6 = syn.clone();
    v6[14] = 0x60;
    cases.push(("not IPv4", v6));
    for (name, input) in cases {
        let before = maps.verdicts()[V_DROP_SOURCE_RANGE as usize];
        let mut out = vec![0u8; input.len() + 128];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{name}: PROG_TEST_RUN: {e:?}"));
        assert_eq!(r.return_value, PASS, "{name}");
        // Never rewritten (the kernel zeroes the Ethernet header it hands
        // a cgroup program).
        assert_eq!(&out[14..r.data_size_out as usize], &input[14..], "{name}");
        assert_eq!(
            maps.verdicts()[V_DROP_SOURCE_RANGE as usize],
            before,
            "{name}: drop_source_range"
        );
    }
}

/// A Maglev Service's new flows go where its table says, the table built
/// here from the endpoints alone (`maglev::table`) and the flow hashed
/// without the node's address (`hash::maglev4`): the same client flow to
/// either of the node's addresses, by tc or by XDP, reaches the same
/// backend, as it would on another node with the same endpoints.
#[test]
fn maglev_flows_go_where_the_table_says_at_every_node_address() {
    use lbctl::agent::{
        maglev,
        model::{BackendAddr, Proto},
    };
    require_root();
    sweep();
    let (fs, mut ebpf) = fixture::datapath();
    let pins = fs.pins();
    let prog: &mut SchedClassifier = ebpf
        .program_mut("lb_from_netdev")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| prog.load()).unwrap();
    let prog: &mut Xdp = ebpf
        .program_mut("lb_xdp_from_netdev")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| prog.load()).unwrap();
    let node2 = Ipv4Addr::new(172, 18, 0, 3);
    let mut node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE, node2],
        snat: None,
        balancing: Default::default(),
    };
    node.balancing.table_size = 251;
    let mut y = String::from(
        r#"
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: demo, annotations: {lbctl.dev/lb-algorithm: maglev}}
spec:
  type: NodePort
  clusterIP: 10.96.0.70
  ports: [{port: 80, nodePort: 30070}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-1, namespace: demo, labels: {kubernetes.io/service-name: shop}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
"#,
    );
    let pods: Vec<Ipv4Addr> = (21..26).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
    for p in &pods {
        y += &format!("- {{addresses: [{p}], nodeName: node-a}}\n");
    }
    let _rec = fixture::program(&pins, &y, &node);

    let entries: Vec<maglev::Entry> = pods
        .iter()
        .map(|a| maglev::Entry {
            addr: BackendAddr {
                addr: *a,
                port: 8080,
                proto: Proto::Tcp,
            },
            weight: 100,
        })
        .collect();
    let table = maglev::table(&entries, 251);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40_000..40_060u16 {
        let h = lb_common::hash::maglev4(
            lb_common::ip4(CLIENT.octets()),
            sport.to_be(),
            30070u16.to_be(),
            6,
        );
        let pod = pods[table[(h % 251) as usize] as usize];
        seen.insert(pod);
        let cl = (CLIENT, sport);
        for (addr, program, verdict) in [
            (NODE, "lb_from_netdev", TC_ACT_OK),
            (node2, "lb_xdp_from_netdev", XDP_PASS),
        ] {
            let syn = Frame::tcp(cl, (addr, 30070), SYN);
            let ran = run_once(&mut ebpf, program, &syn.bytes());
            let name = format!("SYN from port {sport} to {addr}:30070 by {program}");
            assert_eq!(ran.verdict, verdict, "{name}");
            assert_frame(&name, &ran.frame, &syn.with(cl, (pod, 8080)).bytes());
        }
    }
    assert_eq!(seen.len(), pods.len(), "60 flows reach all 5 backends");
}

/// Direct server return, both nodes' halves, in tc and in XDP.
#[test]
fn dsr_sends_in_ipip_and_the_backends_node_answers_from_the_frontend() {
    dsr_both_nodes(false);
}

#[test]
fn dsr_sends_in_ipip_and_the_backends_node_answers_from_the_frontend_in_xdp() {
    dsr_both_nodes(true);
}

/// The frame the first node sends to the backend's: `inner` (already
/// translated) in an outer header from `src` to the backend, naming the
/// frontend `(addr, port)` in its option; built byte by byte here.
fn ipip(inner: &Frame, src: Ipv4Addr, frontend: (Ipv4Addr, u16)) -> Frame {
    let mut option = vec![0x5e, 8];
    option.extend(frontend.1.to_be_bytes());
    option.extend(frontend.0.octets());
    Frame {
        src,
        dst: inner.dst,
        proto: 4,
        ttl: 64,
        ip_id: inner.ip_id,
        frag: 0x4000,
        options: option,
        raw_l4: inner.bytes()[14..].to_vec(),
        ..inner.clone()
    }
}

/// Node-a (the client came to it): a new flow to a NodePort under DSR
/// whose backend is on node-b is translated to the backend, keeps the
/// client's source and leaves in IPIP towards node-b (`forward_dsr`); a
/// segment too big once encapsulated is answered with the route's MTU
/// less the outer header. Node-b (the same programs and maps play it):
/// the IPIP packet is decapsulated for the stack and the backend's reply
/// leaves by tc egress from the NodePort, to the client. An IPIP packet
/// without the option (a CNI's tunnel) passes untouched.
fn dsr_both_nodes(xdp: bool) {
    use lb_common::counters::{V_DSR_DECAPSULATED, V_FORWARD_DSR, V_PASS_UNSUPPORTED};
    require_root();
    sweep();
    const XDP_TX: u32 = 3;
    let NodeNs {
        ns: _ns,
        peer: _peer,
        ifindex,
        netns_path,
    } = NodeNs::new();
    let (fs, _pinned) = fixture::datapath();
    let pins = fs.pins();
    let _rec = program_remote_web(&pins, "lbctl.dev/lb-mode: dsr");
    in_netns(&netns_path, move || {
        let mut ebpf = device_programs(&pins);
        let maps = ServiceMaps::open(&pins).unwrap();
        let mut run = |program: &str, frame: &[u8]| test_run(&mut ebpf, program, frame, ifindex);
        let ingress = if xdp {
            "lb_xdp_from_netdev"
        } else {
            "lb_from_netdev"
        };
        let sent = if xdp { XDP_TX } else { TC_ACT_REDIRECT };
        let passed = if xdp { XDP_PASS } else { TC_ACT_OK };
        let cl = (CLIENT, 40000);
        let nodeport = (NODE, 30080);
        let backend = (Ipv4Addr::new(10, 244, 2, 11), 8080);
        let to_node_b = |f: &Frame| {
            let mut f = ipip(f, NODE, nodeport);
            f.src_mac = NODE_MAC;
            f.dst_mac = NODE_B_MAC;
            f
        };

        // Node-a.
        let mut syn = Frame::tcp(cl, nodeport, SYN);
        syn.dst_mac = NODE_MAC;
        let before = maps.verdicts()[V_FORWARD_DSR as usize];
        let (verdict, out) = run(ingress, &syn.bytes());
        assert_eq!(verdict, sent, "{}", describe(&out));
        let want = to_node_b(&syn.with(cl, backend));
        assert_frame(
            "SYN to a NodePort under DSR: in IPIP to the backend's node",
            &out,
            &want.bytes(),
        );
        assert_eq!(maps.verdicts()[V_FORWARD_DSR as usize], before + 1);
        let mut ack = Frame::tcp(cl, nodeport, ACK);
        ack.dst_mac = NODE_MAC;
        let (verdict, out) = run(ingress, &ack.bytes());
        assert_eq!(verdict, sent, "{}", describe(&out));
        let want_ack = to_node_b(&ack.with(cl, backend));
        assert_frame("the flow's next segment", &out, &want_ack.bytes());
        // 1,500 bytes fit the route but not with the outer header: the
        // client hears 1,472 (tc answers, XDP leaves it to tc).
        let mut big = Frame::tcp(cl, nodeport, ACK);
        big.dst_mac = NODE_MAC;
        big.frag = 0x4000;
        big.payload = vec![7; 1460];
        let (verdict, out) = run("lb_from_netdev", &big.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{}", describe(&out));
        let mut want = Frame::icmp_error_with(&big, 3, 4, [0, 0, 0x05, 0xc0]);
        want.src_mac = NODE_MAC;
        want.dst_mac = big.src_mac;
        assert_frame(
            "too big once encapsulated: fragmentation needed, MTU 1472",
            &out,
            &want.bytes(),
        );
        if xdp {
            let (verdict, out) = run(ingress, &big.bytes());
            assert_eq!((verdict, out), (XDP_PASS, big.bytes()), "left to tc");
        }
        // The DSR flow's reversed tuple names another flow's entry: an
        // SNATed flow to the same backend whose SNAT port is the client's
        // port. The DSR flow's FIN marks its own entry only.
        use lb_common::conntrack::{
            CT_DSR, CT_FIN_ORIGINAL, CT_LIFETIME_TCP_ESTABLISHED, CT_LOCAL_BACKEND, CT_SEEN_REPLY,
            CT_SNAT,
        };
        let dsr_key = tcp_ct_key(cl, nodeport, CT_ORIGINAL);
        let dsr_entry = maps
            .conntrack
            .get(&dsr_key)
            .unwrap()
            .expect("node-a's DSR entry");
        let decoy_key = tcp_ct_key(backend, (NODE, cl.1), CT_REPLY);
        let decoy = lb_common::conntrack::Ct4Entry {
            flags: CT_SNAT | CT_SEEN_REPLY,
            lifetime_s: CT_LIFETIME_TCP_ESTABLISHED,
            ..dsr_entry
        };
        maps.conntrack.insert(&decoy_key, &decoy).unwrap();
        let mut fin = Frame::tcp(cl, nodeport, FIN | ACK);
        fin.dst_mac = NODE_MAC;
        let (verdict, out) = run(ingress, &fin.bytes());
        assert_eq!(verdict, sent, "{}", describe(&out));
        let after = maps.conntrack.get(&dsr_key).unwrap().unwrap();
        assert_ne!(after.flags & CT_FIN_ORIGINAL, 0, "the DSR flow's FIN");
        let other = maps
            .conntrack
            .get(&decoy_key)
            .unwrap()
            .expect("the other flow's entry stays");
        assert_eq!(
            (other.flags, other.lifetime_s, other.last_seen_s),
            (decoy.flags, decoy.lifetime_s, decoy.last_seen_s),
            "the other flow's entry untouched"
        );
        maps.conntrack.remove(&decoy_key).unwrap();

        // Node-b: what node-a sent comes in.
        let mut incoming = want_ack.clone();
        incoming.dst_mac = NODE_MAC;
        let before = maps.verdicts()[V_DSR_DECAPSULATED as usize];
        let (verdict, out) = run(ingress, &incoming.bytes());
        assert_eq!(verdict, passed, "{}", describe(&out));
        // Its Ethernet header stays.
        let mut inner = ack.with(cl, backend);
        inner.src_mac = incoming.src_mac;
        inner.dst_mac = incoming.dst_mac;
        assert_frame("decapsulated for the stack", &out, &inner.bytes());
        assert_eq!(maps.verdicts()[V_DSR_DECAPSULATED as usize], before + 1);
        // The backend's reply leaves from the NodePort, to the client.
        let reply = Frame::tcp(backend, cl, SYN | ACK);
        let (verdict, out) = run("lb_to_netdev", &reply.bytes());
        assert_eq!(verdict, TC_ACT_OK, "{}", describe(&out));
        assert_frame(
            "the backend's reply, from the frontend the client used",
            &out,
            &reply.with(nodeport, cl).bytes(),
        );
        let rkey = tcp_ct_key(backend, cl, CT_REPLY);
        let e = maps
            .conntrack
            .get(&rkey)
            .unwrap()
            .expect("reply entry on node-b");
        assert_eq!(
            e.flags & (CT_DSR | CT_LOCAL_BACKEND | CT_SEEN_REPLY),
            CT_DSR | CT_LOCAL_BACKEND | CT_SEEN_REPLY
        );

        // Another IPIP packet (no option): not ours.
        let mut tunnel = incoming.clone();
        tunnel.options = vec![];
        let before = maps.verdicts()[V_PASS_UNSUPPORTED as usize];
        let (verdict, out) = run(ingress, &tunnel.bytes());
        assert_eq!((verdict, out), (passed, tunnel.bytes()));
        assert_eq!(maps.verdicts()[V_PASS_UNSUPPORTED as usize], before + 1);
    });
}

/// The device programs of the object whose maps are pinned at `pins`,
/// loaded (tc ingress and egress, XDP).
fn device_programs(pins: &std::path::Path) -> Ebpf {
    let mut ebpf = load::load(pins).expect("load");
    for name in ["lb_from_netdev", "lb_to_netdev"] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        lbctl::datapath::load::verified(|| p.load()).unwrap();
    }
    let p: &mut Xdp = ebpf
        .program_mut("lb_xdp_from_netdev")
        .unwrap()
        .try_into()
        .unwrap();
    lbctl::datapath::load::verified(|| p.load()).unwrap();
    ebpf
}

/// One run of `program` on `frame` as if it came in on `ifindex`: its
/// verdict and the frame out (XDP's metadata, when it marked the packet,
/// taken off).
fn test_run(ebpf: &mut Ebpf, program: &str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 128];
    let prog = ebpf.program_mut(program).unwrap();
    let xdp = program.starts_with("lb_xdp");
    let r = if xdp {
        let ctx = xdp_ctx(ifindex, frame.len());
        let p: &mut Xdp = prog.try_into().unwrap();
        p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
    } else {
        let ctx = skb_ctx(ifindex);
        let p: &mut SchedClassifier = prog.try_into().unwrap();
        p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
    }
    .expect("PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    if xdp && out.starts_with(&XDP_SEEN) {
        out.drain(..4);
    }
    (r.return_value, out)
}

#[test]
fn flood_protection_past_the_rate() {
    flood_protection(false);
}

#[test]
fn flood_protection_past_the_rate_in_xdp() {
    flood_protection(true);
}

/// Past a CPU's new-flow rate: a new flow to a Maglev frontend under DSR
/// goes on untracked (the same frame as a tracked one, no conntrack
/// entry), a new flow that needs an entry (a local backend here) is
/// dropped, and established flows go on. The rate is one flow per 1,000
/// seconds, so the second flow is past it; the thread stays on one CPU,
/// whose state it is.
fn flood_protection(xdp: bool) {
    use lb_common::counters::{V_DROP_FLOOD, V_FORWARD_DSR, V_FORWARD_UNTRACKED};
    require_root();
    sweep();
    let NodeNs {
        ns: _ns,
        peer: _peer,
        ifindex,
        netns_path,
    } = NodeNs::new();
    let (fs, _pinned) = fixture::datapath();
    let pins = fs.pins();
    let _rec = program_remote_web(
        &pins,
        "lbctl.dev/lb-mode: dsr, lbctl.dev/lb-algorithm: maglev",
    );
    in_netns(&netns_path, move || {
        // SAFETY: a zeroed set with CPU 0 added; this thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        let mut ebpf = device_programs(&pins);
        let mut maps = ServiceMaps::open(&pins).unwrap();
        let mut config = lb_common::config::Config::default();
        config.flow_interval_ns = 1_000_000_000_000;
        config.flow_burst_ns = config.flow_interval_ns;
        maps.set_config(config).unwrap();
        let verdicts = |maps: &ServiceMaps, v: u32| maps.verdicts()[v as usize];
        let ingress = if xdp {
            "lb_xdp_from_netdev"
        } else {
            "lb_from_netdev"
        };
        let sent = if xdp { XDP_TX_VERDICT } else { TC_ACT_REDIRECT };
        let dropped = if xdp { XDP_DROP } else { TC_ACT_SHOT };
        let nodeport = (NODE, 30080);
        let backend = (Ipv4Addr::new(10, 244, 2, 11), 8080);
        let syn = |port: u16| {
            let mut f = Frame::tcp((CLIENT, port), nodeport, SYN);
            f.dst_mac = NODE_MAC;
            f
        };
        let encapsulated = |f: &Frame| {
            let mut e = ipip(&f.with((f.src, f.sport), backend), NODE, nodeport);
            e.src_mac = NODE_MAC;
            e.dst_mac = NODE_B_MAC;
            e.bytes()
        };
        // The first flow is within the rate: tracked.
        let before = verdicts(&maps, V_FORWARD_DSR);
        let (v, out) = test_run(&mut ebpf, ingress, &syn(41000).bytes(), ifindex);
        assert_eq!(v, sent, "{}", describe(&out));
        assert_frame("within the rate", &out, &encapsulated(&syn(41000)));
        assert_eq!(verdicts(&maps, V_FORWARD_DSR), before + 1);
        // The second is past it: sent alike, untracked.
        let before = verdicts(&maps, V_FORWARD_UNTRACKED);
        let (v, out) = test_run(&mut ebpf, ingress, &syn(41001).bytes(), ifindex);
        assert_eq!(v, sent, "{}", describe(&out));
        assert_frame("past the rate, untracked", &out, &encapsulated(&syn(41001)));
        assert_eq!(verdicts(&maps, V_FORWARD_UNTRACKED), before + 1);
        let tracked = |port: u16| {
            maps.conntrack
                .entries()
                .unwrap()
                .into_iter()
                .any(|(k, _)| k.src_port == port.to_be())
        };
        assert!(tracked(41000) && !tracked(41001));
        // A new flow that needs an entry (the local DNS backend): dropped.
        let mut dns = Frame::udp((CLIENT, 41002), (NODE, 30053));
        dns.dst_mac = NODE_MAC;
        let before = verdicts(&maps, V_DROP_FLOOD);
        let (v, _) = test_run(&mut ebpf, ingress, &dns.bytes(), ifindex);
        assert_eq!(v, dropped);
        assert_eq!(verdicts(&maps, V_DROP_FLOOD), before + 1);
        // The tracked flow goes on.
        let mut ack = Frame::tcp((CLIENT, 41000), nodeport, ACK);
        ack.dst_mac = NODE_MAC;
        let (v, out) = test_run(&mut ebpf, ingress, &ack.bytes(), ifindex);
        assert_eq!(v, sent, "{}", describe(&out));
        assert_frame("an established flow", &out, &encapsulated(&ack));
        maps.set_config(Default::default()).unwrap();
    });
}

/// Programs `MANIFESTS` as node-a's agent would, with `web`'s one
/// endpoint on node-b and `annotations` on `web`.
fn program_remote_web(
    pins: &std::path::Path,
    annotations: &str,
) -> lbctl::agent::reconcile::Reconciler<ServiceMaps> {
    let remote = MANIFESTS
        .replace(
            "endpoints: [{addresses: [10.244.1.5], nodeName: node-a}]",
            "endpoints: [{addresses: [10.244.2.11], nodeName: node-b}]",
        )
        .replace(
            "metadata: {name: web, namespace: demo}",
            &format!("metadata: {{name: web, namespace: demo, annotations: {{{annotations}}}}}"),
        );
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        addresses: vec![NODE],
        snat: None,
        balancing: Default::default(),
    };
    fixture::program(pins, &remote, &node)
}
