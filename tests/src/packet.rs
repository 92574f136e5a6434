//! Frames for datapath tests, built field by field with checksums computed
//! from scratch (not incrementally, as the datapath does), so a checksum bug
//! in the datapath cannot hide in the expectation.

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

/// RFC 1071 ones' complement sum, folded and complemented.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for c in chunks {
        for &b in *c {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ttl: u8,
    pub ip_id: u16,
    /// IP options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// Fragment field (flags and offset), 0 = not a fragment.
    pub frag: u16,
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum ("none").
    pub udp_zero_csum: bool,
    /// TCP only: sequence number, acknowledgment number (None: 2000 when
    /// the ACK flag is set, else 0) and window.
    pub seq: u32,
    pub ack_seq: Option<u32>,
    pub window: u16,
    /// Any other protocol: the whole L4 message, checksum included.
    pub raw_l4: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self::new(TCP, src, dst, flags)
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::new(UDP, src, dst, 0)
    }

    fn new(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp_flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src: src.0,
            dst: dst.0,
            proto,
            sport: src.1,
            dport: dst.1,
            tcp_flags,
            ttl: 64,
            ip_id: 0x1234,
            options: vec![],
            frag: 0,
            payload: b"hello".to_vec(),
            udp_zero_csum: false,
            seq: 1000,
            ack_seq: None,
            window: 64240,
            raw_l4: vec![],
        }
    }

    /// The RST a host that refuses `orig` sends back (RFC 9293 3.10.7.1):
    /// the sequence number from its ACK, else an ACK of everything it
    /// carried (SYN and FIN count one each), no payload, a fresh IP header
    /// (id 0, TTL 64, no options).
    pub fn rst_for(orig: &Frame) -> Self {
        let mut len = orig.payload.len() as u32;
        len += u32::from(orig.tcp_flags & SYN != 0) + u32::from(orig.tcp_flags & FIN != 0);
        let (seq, ack, flags) = if orig.tcp_flags & ACK != 0 {
            (orig.ack_seq.unwrap_or(2000), 0, RST)
        } else {
            (0, orig.seq.wrapping_add(len), RST | ACK)
        };
        Self {
            src_mac: orig.dst_mac,
            dst_mac: orig.src_mac,
            ip_id: 0,
            ttl: 64,
            seq,
            ack_seq: Some(ack),
            window: 0,
            payload: vec![],
            ..Self::tcp((orig.dst, orig.dport), (orig.src, orig.sport), flags)
        }
    }

    /// An ICMP error of `kind`/`code` about `orig`, from its destination
    /// back to its source, quoting its IP header and the first 8 bytes
    /// after it (RFC 792).
    pub fn icmp_error_for(orig: &Frame, kind: u8, code: u8) -> Self {
        Self::icmp_error_with(orig, kind, code, [0; 4])
    }

    /// The same with the header's last four bytes (a fragmentation
    /// needed's next-hop MTU in the last two).
    pub fn icmp_error_with(orig: &Frame, kind: u8, code: u8, rest: [u8; 4]) -> Self {
        let o = orig.bytes();
        let ihl = 20 + orig.options.len();
        let mut msg = vec![kind, code, 0, 0];
        msg.extend(rest);
        msg.extend(&o[14..14 + ihl + 8]);
        let c = checksum(&[&msg]);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        Self {
            src_mac: orig.dst_mac,
            dst_mac: orig.src_mac,
            ip_id: 0,
            ttl: 64,
            raw_l4: msg,
            ..Self::new(ICMP, (orig.dst, 0), (orig.src, 0), 0)
        }
    }

    /// The same frame with other addresses and ports (an expected output).
    pub fn with(&self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self {
            src: src.0,
            sport: src.1,
            dst: dst.0,
            dport: dst.1,
            ..self.clone()
        }
    }

    fn l4(&self) -> Vec<u8> {
        if self.proto != TCP && self.proto != UDP {
            return self.raw_l4.clone();
        }
        let mut h = Vec::new();
        h.extend(self.sport.to_be_bytes());
        h.extend(self.dport.to_be_bytes());
        if self.proto == TCP {
            h.extend(self.seq.to_be_bytes());
            let ack = self
                .ack_seq
                .unwrap_or(if self.tcp_flags & ACK != 0 { 2000 } else { 0 });
            h.extend(ack.to_be_bytes());
            h.push(5 << 4); // data offset
            h.push(self.tcp_flags);
            h.extend(self.window.to_be_bytes());
            h.extend([0, 0]); // checksum
            h.extend([0, 0]); // urgent
        } else {
            h.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            h.extend([0, 0]);
        }
        h.extend(&self.payload);
        let len = h.len() as u16;
        let pseudo = [
            &self.src.octets()[..],
            &self.dst.octets()[..],
            &[0, self.proto],
            &len.to_be_bytes(),
        ]
        .concat();
        let off = if self.proto == TCP { 16 } else { 6 };
        let mut c = checksum(&[&pseudo, &h]);
        if self.proto == UDP {
            if self.udp_zero_csum {
                c = 0;
            } else if c == 0 {
                c = 0xffff;
            }
        }
        h[off..off + 2].copy_from_slice(&c.to_be_bytes());
        h
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ihl = 20 + self.options.len();
        let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
        ip.extend(((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend(self.ip_id.to_be_bytes());
        ip.extend(self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto);
        ip.extend([0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(&self.options);
        let c = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        f.extend(0x0800u16.to_be_bytes());
        f.extend(ip);
        f.extend(l4);
        f
    }
}

impl Frame {
    /// The frame's IP datagram cut into fragments of `chunk` bytes of
    /// payload each (a multiple of 8), as the sender's stack or a router
    /// cuts it (RFC 791): the same IP header with its total length, the
    /// more-fragments flag, the offset in 8-byte units and the header
    /// checksum made anew; the L4 header only in the first.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        assert!(
            chunk.is_multiple_of(8),
            "fragment payloads are multiples of 8 bytes"
        );
        let whole = self.bytes();
        let ihl = 20 + self.options.len();
        let (eth, rest) = whole.split_at(14);
        let (header, payload) = rest.split_at(ihl);
        payload
            .chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let mut ip = header.to_vec();
                ip[2..4].copy_from_slice(&((ihl + part.len()) as u16).to_be_bytes());
                let more = (i + 1) * chunk < payload.len();
                let field = ((i * chunk / 8) as u16) | if more { 0x2000 } else { 0 };
                ip[6..8].copy_from_slice(&field.to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let c = checksum(&[&ip]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                [eth, &ip, part].concat()
            })
            .collect()
    }
}

/// A readable, layer-by-layer rendering of a frame, for mismatch reports.
/// The conntrack key of a TCP packet from `src` to `dst` (address, port),
/// in direction `dir` (`CT_ORIGINAL` or `CT_REPLY`), as the datapath writes it.
pub fn tcp_ct_key(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    dir: u8,
) -> lb_common::conntrack::Ct4Key {
    lb_common::conntrack::Ct4Key {
        src_addr: lb_common::ip4(src.0.octets()),
        dst_addr: lb_common::ip4(dst.0.octets()),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        proto: 6,
        dir,
        _pad: 0,
    }
}

pub fn describe(b: &[u8]) -> String {
    let mut s = String::new();
    if b.len() < 14 {
        return format!("truncated ethernet: {b:02x?}");
    }
    s += &format!(
        "eth  dst={:02x?} src={:02x?} type={:#06x}\n",
        &b[0..6],
        &b[6..12],
        u16::from_be_bytes([b[12], b[13]])
    );
    let ip = &b[14..];
    if ip.len() < 20 {
        return s + &format!("truncated ip: {ip:02x?}");
    }
    let ihl = (ip[0] & 0xf) as usize * 4;
    s += &format!(
        "ip   ihl={} len={} id={:#06x} frag={:#06x} ttl={} proto={} csum={:#06x} src={} dst={}\n",
        ihl,
        u16::from_be_bytes([ip[2], ip[3]]),
        u16::from_be_bytes([ip[4], ip[5]]),
        u16::from_be_bytes([ip[6], ip[7]]),
        ip[8],
        ip[9],
        u16::from_be_bytes([ip[10], ip[11]]),
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
    );
    let l4 = &ip[ihl.min(ip.len())..];
    if l4.len() >= 8 {
        let csum_off = if ip[9] == TCP { 16 } else { 6 };
        s += &format!(
            "l4   sport={} dport={} csum={:#06x}\n",
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
            l4.get(csum_off..csum_off + 2)
                .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]))
        );
    }
    s + &format!("raw  {b:02x?}\n")
}

/// Asserts two frames are equal, printing both layer by layer if not.
#[track_caller]
pub fn assert_frame(case: &str, got: &[u8], want: &[u8]) {
    if got != want {
        panic!(
            "{case}: output frame differs\n--- got\n{}--- want\n{}",
            describe(got),
            describe(want)
        );
    }
}
